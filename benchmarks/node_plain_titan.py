"""Plain TorchTitan (its own train.main, no supervise hooks) made runnable on CPU:
the baseline the node benchmark compares against. Run under torchrun."""

from supervisor.titan import cpu_compat

if __name__ == "__main__":
    cpu_compat.apply()
    from torchtitan.train import main

    main()
