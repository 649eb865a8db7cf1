"""ELMo on the shared engine (`common`), imported first: it sets host memory up before any JAX computation."""
import common  # noqa: F401  pylint: disable=unused-import
