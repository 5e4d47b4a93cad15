"""`python -m supervisor` is `supervise` (for machines where the console script is not on PATH)."""

from supervisor.entry import main

main()
