"""The runtime: the host store, the copies, the hooks and the strategies that carry out a plan's schedule."""
