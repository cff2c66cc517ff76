"""The Kubernetes CSI node plugin: ``modelfs csi``.

A pod names a model in an ephemeral inline volume; kubelet asks this plugin, over gRPC on a
unix socket, to publish it at a target path; the plugin starts one modelfs mount daemon there,
on the node's shared block cache, and answers once the mount does. The modules follow the
request's path: :mod:`.volume` checks what the pod asked for, :mod:`.records` remembers what is
published, :mod:`.daemons` starts, checks and stops mount daemons, :mod:`.node` is the Node
service's logic on trio, and :mod:`.server` puts it on gRPC.
"""

DRIVER_NAME = "csi.modelfs.io"
