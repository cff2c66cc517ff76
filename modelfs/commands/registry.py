"""``login``, ``logout``, ``push`` and ``index attach``: commands that write to a registry
(through :mod:`modelfs.compose`, never through a mirror)."""

from __future__ import annotations

import argparse
import getpass
import sys

from ..artifact.layout import Store
from ..artifact.push import push, push_size
from ..compose import open_writer
from ..credentials import Credential, CredentialStore
from ..errors import ModelfsError
from ..index import attach_for_model
from ..reference import parse
from ..resolve import fetch_model
from .base import settings_for
from .output import Progress


async def cmd_login(args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
    elif not sys.stdin.isatty():
        raise ModelfsError("no terminal to ask for the password on: pipe it in with --password-stdin "
                           f"(printf %s \"$TOKEN\" | modelfs login {args.registry} -u {args.username or 'USER'} "
                           "--password-stdin)")
    else:
        password = getpass.getpass(f"Password for {args.username}@{args.registry}: ")
    if not args.username or not password:
        raise ModelfsError("login needs a username (-u) and a password")
    credential = Credential(args.username, password)
    async with open_writer(settings_for(args, args.registry)) as client:
        client.use_credential(credential)
        await client.check_login()
    CredentialStore().save(args.registry, credential)
    print(f"Login succeeded for {args.registry}")
    return 0


async def cmd_logout(args: argparse.Namespace) -> int:
    if not CredentialStore().remove(args.registry):
        raise ModelfsError(f"not logged in to {args.registry}")
    print(f"Removed credentials for {args.registry}")
    return 0


async def cmd_push(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    store = Store(args.store)
    progress = Progress(push_size(store, reference, args.source), f"push {reference}")
    async with open_writer(settings_for(args, reference.registry)) as client:
        result = await push(client, store, reference, args.source, chunk_size=args.chunk_size << 20,
                            block_index=not args.no_block_index, progress=progress, skipped=progress.skip)
    progress.finish()
    chunked = f", {result.chunked} in chunks" if result.chunked else ""
    print(f"Pushed {reference}: {len(result.uploaded)} blobs uploaded ({result.uploaded_bytes / 1e6:,.1f} MB{chunked}), "
          f"{len(result.skipped)} already present, {len(result.mounted)} mounted; digest {result.digest}")
    return 0


async def cmd_index_attach(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    async with open_writer(settings_for(args, reference.registry)) as client:
        model = await fetch_model(client, reference)
        result = await attach_for_model(client, model)
    print(f"Attached a block index to {model.reference} ({result.blobs} blobs, {result.bytes / 1e6:,.1f} MB hashed): "
          f"{result.digest}")
    return 0
