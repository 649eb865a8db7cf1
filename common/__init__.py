"""What every model shares. Importing it first sets the host allocator for XLA:CPU (`common.host_memory`)."""
from common import host_memory as _host_memory

_host_memory.keep_freed_memory()
