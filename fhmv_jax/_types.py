"""jaxtyping aliases used across the package."""

from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

Scalar = Float[Array, ""]
Observations = Float[Array, "T D"]
Driver = Float[Array, " T"]

__all__ = ["Array", "Bool", "Float", "Int", "PRNGKeyArray", "Scalar", "Observations", "Driver"]
