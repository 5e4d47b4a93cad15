"""What crosses a process or bucket boundary: the node command (node.NodeOptions) and
the run's layout in the bucket (layout.RunLayout). Torch-free, imports nothing heavy."""
