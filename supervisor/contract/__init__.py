"""What crosses a process or bucket boundary: the node command (node.NodeOptions), the
run's layout in the bucket (layout.RunLayout), the wrapper<->trainer run dir and
environment (runtime), exit codes (exitcodes) and job states (jobstate). Torch-free."""
