"""openvla_jax: OpenVLA (Llama 2 + fused DINOv2/SigLIP, actions as 256-bin tokens) in JAX/Flax."""

from openvla_jax.utils.platforms import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()  # no CUDA/TPU start-up noise on a host without them


def __getattr__(name):  # lazy: `import openvla_jax.data...` should not pay for building the model
    if name == "OpenVLA":
        from openvla_jax.policy import OpenVLA

        return OpenVLA
    raise AttributeError(name)


__all__ = ["OpenVLA"]  # pyright: ignore[reportUnsupportedDunderAll]  (provided lazily by __getattr__)
