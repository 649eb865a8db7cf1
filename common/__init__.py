"""What every model shares. Importing it sets how XLA:CPU gets host memory (`common.host_memory`), so it must come
before the first JAX computation."""
from common import host_memory as _host_memory

_host_memory.keep_freed_memory()
