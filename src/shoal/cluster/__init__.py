"""Several machines: the gateway joins an existing Ray cluster (`shoal serve --ray-address`).

One node agent (agent.py, a Ray actor pinned to its node, no CPUs reserved) per Ray node reports
that node's devices and runners' memory, and spawns and stops runner processes there. Runners on
agents listen on TCP; the gateway proxies to them. Device ids carry the node ("node-ab12cd34/gpu:0")
so the one scheduler sees every node's devices. `RayHost` is the Host (shoal.hosts) the model
service is given in Ray mode. files.py brings local-path model files to nodes
that lack them; gateway.py is the gateway's view of it all. Ray itself is imported only in Ray mode.
"""

from shoal.cluster.gateway import RayHost, RemoteRunner, split_device

__all__ = ["RayHost", "RemoteRunner", "split_device"]
