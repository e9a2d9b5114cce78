"""Every built-in task trains: the loss falls within a short run."""

import pytest

import batchlab
from batchlab.tasks import BUILTIN_TASKS, DEFAULT_TASK

STEPS = {"charlm": 60, "dots": 600}


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_builtin_task_loss_falls(name):
    task = batchlab.load_task(name)
    steps = STEPS.get(name, 80)
    history = batchlab.train(task, task.batch_size, max_steps=steps, eval_every=steps)
    first = sum(history.train_loss[:5]) / 5
    last = sum(history.train_loss[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert history.evals[-1].val_loss < history.evals[0].val_loss
    assert history.total_steps == steps and not history.diverged


def test_builtin_data_is_deterministic():
    a = batchlab.load_task("dots").train_data.tensors[0]
    from batchlab.tasks.dots import make_spirals

    b, _ = make_spirals(2500)
    assert (a == b[:2000]).all()


def test_default_task_is_builtin():
    assert DEFAULT_TASK in BUILTIN_TASKS


def test_mnist1d_shapes_match_the_paper():
    task = batchlab.load_task("mnist1d-cnn")
    x, y = task.train_data.tensors
    assert tuple(x.shape) == (4000, 40) and task.num_val == 1000
    assert int(y.max()) == 9


def test_charlm_corpus_is_a_few_megabytes_of_stdlib_source():
    from batchlab.tasks.charlm import stdlib_corpus

    corpus = stdlib_corpus()
    assert len(corpus) >= 1_000_000
    assert b"def " in corpus and b"import " in corpus
