"""Pure models shared by the planner, the controller and the measurements: no nn.Module, no I/O."""
