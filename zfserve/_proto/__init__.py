"""Generated gRPC stubs (scripts/gen_proto.py); do not edit the modules below this package.

POOL holds every zfserve descriptor (a private pool, so tritonclient's own `inference` protos can be
imported in the same process)."""
from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
