"""CSI over gRPC: the Identity and Node services on a unix socket, answering from trio.

grpcio serves each call on a thread of its pool; the call hands its request to the trio loop
(``trio.from_thread.run``), which owns every piece of state, and waits for the answer. The
services are built from the descriptors of ``csi.proto`` (the spec's own messages), so a method
the plugin does not implement answers UNIMPLEMENTED as the spec wants.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import trio
from google.protobuf import wrappers_pb2

from .. import __version__
from ..errors import ModelfsError, user_error
from . import DRIVER_NAME, csi_pb2
from .node import Node, NodeOptions, status_code

log = logging.getLogger("modelfs.csi")

GRPC_THREADS = 16  # calls in progress at once; kubelet publishes a node's volumes concurrently


def socket_path(endpoint: str) -> str:
    """The path of ``unix:///csi/csi.sock`` (also ``unix:/path`` or a bare absolute path)."""
    path = endpoint.removeprefix("unix://") if endpoint.startswith("unix://") else endpoint.removeprefix("unix:")
    if not path.startswith("/"):
        raise ModelfsError(f"--endpoint must be a unix socket like unix:///csi/csi.sock, not {endpoint!r}")
    return path


class Services:
    """The RPCs, as grpcio calls them (on its threads)."""

    def __init__(self, node: Node, token: trio.lowlevel.TrioToken) -> None:
        self.node = node
        self.token = token

    # -- Identity

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.GetPluginCapabilitiesResponse()  # a node plugin only: no controller service

    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not os.path.exists("/dev/fuse"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no /dev/fuse: give the plugin's container the host's "
                          "/dev/fuse (deploy/kubernetes/node.yaml does)")
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))

    # -- Node

    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetCapabilitiesResponse()  # no staging: each publish is a mount of its own

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node.options.node_id)

    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("NodePublishVolume", request.volume_id, request.target_path, context, self.node.publish, request,
                   context.time_remaining())
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("NodeUnpublishVolume", request.volume_id, request.target_path, context, self.node.unpublish,
                   request.volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _call(self, name: str, volume_id: str, target: str, context: grpc.ServicerContext,
              run: Callable[..., Awaitable[str]], *args: Any) -> None:
        """Run ``run`` on the trio loop; a failure becomes the gRPC status it deserves."""
        try:
            done = trio.from_thread.run(run, *args, trio_token=self.token)
        except trio.RunFinishedError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the plugin is shutting down; ask again")
        except Exception as exc:  # noqa: BLE001 - every failure must reach kubelet as a status
            error = user_error(exc)
            if error is None:
                log.exception("%s of %s at %s failed unexpectedly", name, volume_id, target)
                error = ModelfsError(f"unexpected {type(exc).__name__}: {exc}")
            code = status_code(error)
            log.warning("%s of %s at %s: %s: %s", name, volume_id, target, code.name, error)
            context.abort(code, str(error))
        log.info("%s of %s at %s: %s", name, volume_id, target, done)


def handlers(services: Services) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service of csi.proto, each method bound to ``services``."""
    found = []
    for service in csi_pb2.DESCRIPTOR.services_by_name.values():
        methods = {}
        for method in service.methods:
            request = getattr(csi_pb2, method.input_type.name)
            response = getattr(csi_pb2, method.output_type.name)
            methods[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(services, method.name), request_deserializer=request.FromString,
                response_serializer=response.SerializeToString)
        found.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return found


async def serve(options: NodeOptions, endpoint: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled. Mounts are left serving when the plugin stops: an upgrade or a
    restart must not take models away from running pods."""
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a socket left by a plugin that was killed
    async with trio.open_nursery() as nursery:
        node = Node(options, nursery)
        server = grpc.server(ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="csi-grpc"))
        server.add_generic_rpc_handlers(handlers(Services(node, trio.lowlevel.current_trio_token())))
        old_umask = os.umask(0o077)  # the socket: root only, as kubelet and the registrar are
        try:
            if server.add_insecure_port(f"unix://{path}") == 0:
                raise ModelfsError(f"cannot listen on {path}")
        finally:
            os.umask(old_umask)
        server.start()
        try:
            nursery.start_soon(node.keep_recovering)
            log.info("CSI driver %s %s serving on %s (node %s, cache %s)", DRIVER_NAME, __version__, path,
                     options.node_id, options.cache_dir)
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: server.stop(grace=5).wait())
                if os.path.exists(path):
                    os.unlink(path)
            nursery.cancel_scope.cancel()
