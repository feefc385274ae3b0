import jax
import matplotlib

# Tests compare against float64 references; float32 paths are tested explicitly.
jax.config.update("jax_enable_x64", True)
matplotlib.use("Agg")
