"""The control socket: QMP over a unix socket for stacks that steer migrations from outside Python."""
