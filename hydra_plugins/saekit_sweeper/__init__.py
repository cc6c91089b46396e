"""saekit's Hydra sweeper (`hydra/sweeper=saekit`, saekit's default): Hydra's basic sweeper plus `groups`.

Hydra discovers sweepers only inside the `hydra_plugins` namespace package, so this small module lives here and
the logic it needs lives in saekit.sweep.
"""
