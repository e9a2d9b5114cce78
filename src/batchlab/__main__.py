from batchlab.cli import run

run()
