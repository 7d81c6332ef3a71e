"""The `sidecar` command (docs/reference.md#commands).

Thin: each subcommand parses arguments, calls the library, and raises. Only
`main()` turns errors into exit codes: 0 ok, 1 user error (one message on
stderr), 2 usage error (argparse). Secret values come from stdin only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import secrets as _random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sidecar import __version__
from sidecar.crypto import Opener, generate_private_key, write_private_key
from sidecar.errors import ConfigError, UserError, VaultError, problems_text
from sidecar.names import NAME_RULE, is_name
from sidecar.secret import Secret
from sidecar.vault import (
    MAX_CREDITS_USD,
    MAX_RATE_LIMIT,
    add_access_key,
    attach_key,
    create_vault,
    edit_vault,
    now_iso,
    parse_iso,
    read_vault,
    set_secret,
)

if TYPE_CHECKING:
    from sidecar.config import HostPort
    from sidecar.inject.annotations import SidecarSettings

# Config, server and demo modules are imported where used: vault edits stay fast to start.

CONFIG_ENV: Final = "SIDECAR_CONFIG"
# `sidecar demo` defaults (tests hold them equal to `sidecar.demo.DEFAULTS`).
_DEMO_LISTEN: Final = "127.0.0.1:8080"
_DEMO_ADMIN_LISTEN: Final = "127.0.0.1:9090"
_DEMO_MOCK_LISTEN: Final = "127.0.0.1:8089"
_ADMIN_URL: Final = "http://127.0.0.1:9090"
_ADMIN_TIMEOUT_S: Final = 5.0
_STATUS_COLUMNS: Final = ("provider", "source", "key_id", "access_key", "model", "state",
                          "until", "reason", "last_status")  # fmt: skip
_INJECT_LISTEN: Final = "0.0.0.0:8443"
_INJECT_SERVICE: Final = "ai-gateway-sidecar-injector"
_INJECT_NAMESPACE: Final = "ai-gateway-sidecar"
_KEEP: Final = object()  # `set-limits`: the option was not given, keep the limit
_NO_CONFIG: Final = (
    f"no config: pass --config PATH or set {CONFIG_ENV} "
    "(for the self-contained demo, run `sidecar demo`)"
)


def _name(kind: str) -> Callable[[str], str]:
    def conv(value: str) -> str:
        if not is_name(value):
            raise argparse.ArgumentTypeError(f"invalid {kind} {value!r}: use {NAME_RULE}")
        return value

    return conv


def _usd(value: str) -> float:
    try:
        amount = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {value!r}") from None
    if not 0 <= amount <= MAX_CREDITS_USD:  # (also NaN)
        raise argparse.ArgumentTypeError(
            f"expected an amount in USD from 0 to {MAX_CREDITS_USD:g}"
        )
    return amount


def _rate_limit(value: str) -> int:
    """A per-minute limit: a plain decimal integer from 1 to `MAX_RATE_LIMIT`."""
    # Digits only: `int()` would also take "+5", " 5", "1_000" and non-ASCII digits.
    limit = int(value) if value.isascii() and value.isdigit() and len(value) <= 10 else 0
    if not 1 <= limit <= MAX_RATE_LIMIT:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_RATE_LIMIT}, got {value!r}"
        )
    return limit


def _rate_limit_or_none(value: str) -> int | None:
    """`_rate_limit`, or `none` for unlimited."""
    if value.lower() == "none":
        return None
    try:
        return _rate_limit(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_RATE_LIMIT} or `none`, got {value!r}"
        ) from None


def _address(value: str) -> HostPort:
    from sidecar.config import parse_host_port

    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _image(value: str) -> str:
    from sidecar.inject.annotations import IMAGE_MAX, is_image

    if not is_image(value):
        raise argparse.ArgumentTypeError(
            f"expected an image reference (registry/name:tag or @sha256:..., at most {IMAGE_MAX})"
        )
    return value


def _dns_label(value: str) -> str:
    """A Service or namespace name: a DNS-1123 label."""
    from sidecar.inject.annotations import is_dns1123_subdomain

    if "." in value or len(value) > 63 or not is_dns1123_subdomain(value):
        raise argparse.ArgumentTypeError(
            f"invalid name {value!r}: lowercase letters, digits and '-' (at most 63)"
        )
    return value


def _days(value: str) -> int:
    days = int(value) if value.isascii() and value.isdigit() and len(value) <= 5 else 0
    if not 1 <= days <= 3650:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of days from 1 to 3650, got {value!r}"
        )
    return days


def _config_path(args: argparse.Namespace) -> Path | None:
    """`--config`, else `SIDECAR_CONFIG`, else None."""
    value = args.config or os.environ.get(CONFIG_ENV)
    return Path(value) if value else None


def _read_stdin_secret(what: str) -> Secret:
    """A secret from standard input; typed at a terminal, it is not echoed."""
    if sys.stdin is None:
        value = ""
    elif sys.stdin.isatty():
        value = getpass.getpass(f"{what} (not echoed): ").strip()
    else:
        value = sys.stdin.read().strip()
    if not value:
        raise UserError(f"no {what} on standard input")
    if value.find("\r") >= 0 or value.find("\n") >= 0:  # it would split a request's head
        raise UserError(f"the {what} on standard input has a line break inside it")
    return Secret(value)


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


# --------------------------------------------------------------------------- commands


def cmd_keygen(args: argparse.Namespace) -> None:
    key = generate_private_key()
    write_private_key(Path(args.private_key), key)
    _out(Opener(key).public_key)


def cmd_vault_init(args: argparse.Namespace) -> None:
    create_vault(Path(args.vault), args.public_key.strip())
    print(f"created {args.vault}", file=sys.stderr)


def cmd_secret_set(args: argparse.Namespace) -> None:
    value = _read_stdin_secret(f"value for {args.namespace}/{args.name}")
    with edit_vault(Path(args.vault)) as doc:
        set_secret(doc, args.namespace, args.name, value)
    print(f"sealed secrets/{args.namespace}/{args.name}", file=sys.stderr)


def cmd_secret_list(args: argparse.Namespace) -> None:
    doc = read_vault(Path(args.vault))
    for ns in sorted(doc.secrets):
        for name in sorted(doc.secrets[ns]):
            _out(f"{ns}\t{name}")


def cmd_access_key_create(args: argparse.Namespace) -> None:
    with edit_vault(Path(args.vault)) as doc:
        token = add_access_key(doc, args.name, credits_usd=args.credits,
                               providers=args.allow_provider or [], models=args.allow_model or [],
                               rpm=args.rpm, tpm=args.tpm)  # fmt: skip
    # The one and only time an access key is shown: stdout, alone, for scripts.
    _out(token.reveal())


def cmd_access_key_revoke(args: argparse.Namespace) -> None:
    with edit_vault(Path(args.vault)) as doc:
        entry = doc.access_keys.get(args.name)
        if entry is None:
            raise UserError(f"no access key named {args.name!r}")
        if not entry.revoked:
            entry.revoked = True
            entry.revoked_at = now_iso()
    print(f"revoked {args.name}", file=sys.stderr)


def cmd_access_key_set_credits(args: argparse.Namespace) -> None:
    with edit_vault(Path(args.vault)) as doc:
        entry = doc.access_keys.get(args.name)
        if entry is None:
            raise UserError(f"no access key named {args.name!r}")
        entry.credits_usd = args.usd
    print(f"{args.name}: credits grant set to {args.usd:.2f} USD", file=sys.stderr)


def cmd_access_key_set_limits(args: argparse.Namespace) -> None:
    if args.rpm is _KEEP and args.tpm is _KEEP:
        args.usage_error("give --rpm, --tpm or both (N, or `none` for unlimited)")  # exits 2
        return
    with edit_vault(Path(args.vault)) as doc:
        entry = doc.access_keys.get(args.name)
        if entry is None:
            raise UserError(f"no access key named {args.name!r}")
        if args.rpm is not _KEEP:
            entry.rpm = args.rpm
        if args.tpm is not _KEEP:
            entry.tpm = args.tpm
    print(
        f"{args.name}: rpm {_limit_text(entry.rpm)}, tpm {_limit_text(entry.tpm)}", file=sys.stderr
    )


def _limit_text(limit: int | None, unlimited: str = "unlimited") -> str:
    return unlimited if limit is None else str(limit)


def cmd_access_key_list(args: argparse.Namespace) -> None:
    doc = read_vault(Path(args.vault))
    names = sorted(doc.access_keys)
    spent = _spent_from_ledger(_config_path(args), names)
    _out("NAME\tSTATUS\tCREDITS_USD\tSPENT_USD\tREMAINING_USD\tRPM\tTPM\tPROVIDERS\tMODELS\tATTACHED\tCREATED\tREVOKED")  # fmt: skip
    for name in names:
        e = doc.access_keys[name]
        if spent is None:
            spent_usd = remaining_usd = "unknown"
        else:
            spent_usd = _usd_text(spent.get(name, 0))
            remaining_usd = _usd_text(round(e.credits_usd * 1_000_000) - spent.get(name, 0))
        _out(
            "\t".join(
                [
                    name,
                    "revoked" if e.revoked else "active",
                    f"{e.credits_usd:.2f}",
                    spent_usd,
                    remaining_usd,
                    _limit_text(e.rpm, "-"),
                    _limit_text(e.tpm, "-"),
                    ",".join(e.allowed_providers) or "*",
                    ",".join(e.allowed_models) or "*",
                    str(len(e.attached)),
                    e.created_at,
                    e.revoked_at or "-",
                ]
            )
        )


def _usd_text(micro_usd: int) -> str:
    """Micro-USD as USD with cents, rounded half away from zero (exact: integers only)."""
    cents, rest = divmod(abs(micro_usd), 10_000)
    cents += rest >= 5_000
    sign = "-" if micro_usd < 0 and cents else ""
    return f"{sign}{cents // 100}.{cents % 100:02d}"


def _spent_from_ledger(config_path: Path | None, names: Sequence[str]) -> Mapping[str, int] | None:
    """Spend per access key (micro-USD) from the ledger the config names.

    None, with one note on stderr, when it cannot be known: no config, an
    in-memory ledger (only the running sidecar has it) or an unreachable one.
    """
    from sidecar.config import load_config
    from sidecar.ledger import LedgerUnavailable, open_ledger, parse_ledger_url
    from sidecar.ledger.sqlite import MEMORY

    if config_path is None:
        print(f"note: spent unknown: name the config (--config PATH or {CONFIG_ENV}) "
              "to read its ledger", file=sys.stderr)  # fmt: skip
        return None
    config = load_config(config_path)
    _, target = parse_ledger_url(config.ledger.url)
    if target == MEMORY:
        print("note: spent unknown: the ledger is in memory (sqlite://:memory:); "
              "only the running sidecar has it", file=sys.stderr)  # fmt: skip
        return None
    # Read only: a file created here (by another user, say root) would lock the sidecar out.
    ledger = open_ledger(config.ledger.url, base_dir=config.base_dir, create=False)

    async def read() -> dict[str, int]:
        try:
            return {name: await ledger.spent(name) for name in names}
        finally:
            await ledger.close()

    try:
        return asyncio.run(read())
    except LedgerUnavailable as exc:
        print(f"note: spent unknown: {exc}", file=sys.stderr)
        return None


def cmd_provider_key_attach(args: argparse.Namespace) -> None:
    vault = Path(args.vault)
    # Read before the secret, so a bad --config fails before anything is typed or sealed.
    declared = _declared_providers(vault, Path(args.config) if args.config else None)
    value = _read_stdin_secret(f"{args.provider} key")
    key_id = args.id or f"{args.provider}-{_random.token_hex(4)}"
    with edit_vault(vault) as doc:
        attach_key(doc, args.access_key, args.provider, key_id, value)
    _out(key_id)
    warning = _unknown_provider_warning(args.provider, declared)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def _declared_providers(vault: Path, config: Path | None) -> dict[Path, set[str]]:
    """Provider ids per config: the `--config` one, or every config beside the vault.

    A config beside the vault is a `*.yaml`/`*.yml` regular file in the vault's
    folder that loads and whose `vault.path` is this vault; others are skipped.
    """
    from sidecar.config import load_config

    if config is not None:
        return {config: {p.id for p in load_config(config).providers}}
    found: dict[Path, set[str]] = {}
    target = vault.resolve()
    candidates = sorted([*vault.parent.glob("*.yaml"), *vault.parent.glob("*.yml")])
    for path in candidates:
        if not path.is_file():  # a FIFO or device would block the read
            continue
        try:
            loaded = load_config(path)
        except ConfigError:
            continue
        if loaded.vault.path.resolve() == target:
            found[path] = {p.id for p in loaded.providers}
    return found


def _unknown_provider_warning(provider: str, declared: Mapping[Path, set[str]]) -> str | None:
    """Why `provider` looks like a typo, or None when it is built in or declared."""
    from sidecar.catalog import BUILTIN_PROVIDERS

    if provider in BUILTIN_PROVIDERS or any(provider in ids for ids in declared.values()):
        return None
    head = f"provider {provider!r} is not built in ({', '.join(BUILTIN_PROVIDERS)})"
    if not declared:
        return (f"{head} and no config beside the vault uses this vault to declare it "
                "(pass --config PATH to check against one)")  # fmt: skip
    where = ", ".join(str(p) for p in declared)
    return f"{head} and not declared in {where}; `sidecar check` will report the key"


def cmd_provider_key_detach(args: argparse.Namespace) -> None:
    with edit_vault(Path(args.vault)) as doc:
        entry = doc.access_keys.get(args.access_key)
        if entry is None:
            raise UserError(f"no access key named {args.access_key!r}")
        kept = [a for a in entry.attached if a.id != args.id]
        if len(kept) == len(entry.attached):
            raise UserError(f"{args.access_key} has no attached key with id {args.id!r}")
        entry.attached = kept
    print(f"detached {args.id} from {args.access_key}", file=sys.stderr)


def cmd_provider_key_list(args: argparse.Namespace) -> None:
    doc = read_vault(Path(args.vault))
    if args.access_key and args.access_key not in doc.access_keys:
        raise UserError(f"no access key named {args.access_key!r}")
    _out("ACCESS_KEY\tID\tPROVIDER\tATTACHED_AT")
    for name in sorted(doc.access_keys):
        if args.access_key and name != args.access_key:
            continue
        attached = doc.access_keys[name].attached
        # newest first, ties to the later entry: the order serving tries them in
        for _, _, a in sorted(
            ((parse_iso(a.attached_at), i, a) for i, a in enumerate(attached)), reverse=True
        ):
            _out(f"{name}\t{a.id}\t{a.provider}\t{a.attached_at}")


def cmd_check(args: argparse.Namespace) -> None:
    from sidecar.check import run_check

    problems = run_check(Path(args.config))
    if problems:
        raise UserError(f"{len(problems)} problem(s):\n" + problems_text(problems))
    print(f"{args.config}: ok", file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> None:
    from sidecar.migrate import migrate

    for line in migrate(Path(args.config), args.access_key or []):
        print(line, file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    config = _config_path(args)
    if config is None:
        args.usage_error(_NO_CONFIG)  # exits 2; never a silent demo
        return
    from sidecar.server import serve_forever

    serve_forever(config)


def cmd_demo(args: argparse.Namespace) -> None:
    from sidecar.demo import DemoAddresses, run_demo

    run_demo(Path(args.dir), DemoAddresses(args.listen, args.admin_listen, args.mock_listen))


def cmd_status(args: argparse.Namespace) -> None:
    for line in status_table(_fetch_keys(args.admin)):
        _out(line)


def _fetch_keys(admin: str) -> list[dict[str, object]]:
    """`GET /keys` of a running sidecar's admin port (stdlib only, bounded wait)."""
    import http.client
    import json
    import urllib.error
    import urllib.request

    base = admin.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UserError(f"--admin: expected an http:// or https:// URL, got {admin!r}")
    url = base + "/keys"
    try:
        with urllib.request.urlopen(url, timeout=_ADMIN_TIMEOUT_S) as resp:
            body = resp.read(16 << 20)
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url} answered {exc.code}; is {base} a sidecar's admin port?") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot reach the admin port at {base}: {reason}") from None
    try:
        keys = json.loads(body)["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{url} did not answer a key list; is {base} a sidecar's admin port?"
        ) from None
    return keys


def status_table(keys: Sequence[Mapping[str, object]]) -> list[str]:
    """Aligned columns, `-` for an empty field: fields never contain spaces, so `awk` splits them."""
    rows = [[c.upper() for c in _STATUS_COLUMNS]]
    rows += [
        ["-" if k.get(c) in (None, "") else str(k.get(c)) for c in _STATUS_COLUMNS] for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_STATUS_COLUMNS))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def cmd_inject(args: argparse.Namespace) -> None:
    from sidecar.inject.annotations import DEFAULT_IMAGE, SidecarSettings

    defaults = SidecarSettings(image=args.image or DEFAULT_IMAGE)
    if args.make_certs:
        _inject_make_certs(args)
    elif args.dry_run:
        if not args.filename:
            args.usage_error("--dry-run needs -f FILE (- for standard input)")  # exits 2
            return
        _inject_dry_run(args.filename, defaults)
    else:
        if not (args.tls_cert and args.tls_key):
            args.usage_error("serving needs --tls-cert and --tls-key (or use --dry-run)")  # exits 2
            return
        _inject_serve(args.listen, Path(args.tls_cert), Path(args.tls_key), defaults)


def _inject_dry_run(filename: str, defaults: SidecarSettings) -> None:
    from sidecar.inject.manifests import ManifestError, inject_documents

    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"cannot read {filename}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    try:
        result = inject_documents(text, defaults)
    except ManifestError as exc:
        raise UserError(f"{filename}: {exc}") from None
    sys.stdout.write(result.text)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"injected {result.injected} pod template(s)", file=sys.stderr)


def _inject_serve(listen: HostPort, cert: Path, key: Path, defaults: SidecarSettings) -> None:
    import ssl

    from sidecar.inject.webhook import ServingCert, serve
    from sidecar.logs import OpLog

    try:
        certs = ServingCert(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(
            f"cannot load --tls-cert/--tls-key: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen, certs, defaults, OpLog()))


def _inject_make_certs(args: argparse.Namespace) -> None:
    from sidecar.inject.certs import make_certs

    made = make_certs(Path(args.make_certs), args.service, args.namespace, days=args.days)
    _out(made.ca_bundle)
    secret = f"{args.service}-tls"
    print(
        f"wrote {made.ca}, {made.cert} and {made.key} (for {made.dns_names[2]}, valid until "
        f"{made.not_after:%Y-%m-%d}); the CA's private key was not kept.\n"
        "next:\n"
        f"  kubectl -n {args.namespace} create secret tls {secret} "
        f"--cert={made.cert} --key={made.key}\n"
        f"  kubectl patch mutatingwebhookconfiguration {_INJECT_SERVICE} --type=json "
        '-p \'[{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", '
        '"value": "\'"$CA_BUNDLE"\'"}]\'\n'
        "  (CA_BUNDLE is the line printed on standard output)",
        file=sys.stderr,
    )


def cmd_mock_provider(args: argparse.Namespace) -> None:
    from sidecar.config import parse_host_port
    from sidecar.mock_provider import run

    try:
        addr = parse_host_port(args.listen)
    except ValueError as exc:
        raise UserError(f"--listen: {exc}") from None
    import uvloop

    print(f"mock provider listening on http://{addr}", file=sys.stderr)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(run(addr.host, addr.port))
    except OSError as exc:
        raise UserError(f"cannot listen on {addr}: {exc.strerror}") from None


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar",
        description="AI gateway sidecar: apps send an access key, the sidecar picks the provider key.",
    )
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def vault_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--vault", required=True, metavar="PATH", help="the vault file (JSON)")

    s = sub.add_parser("serve", help="run the proxy and the admin server",
                       description="Run the proxy and the admin server with the config named by "
                       f"--config or ${CONFIG_ENV}. Without either, exit 2 (try `sidecar demo`).")  # fmt: skip
    s.add_argument("--config", metavar="PATH", help=f"config file (YAML); default ${CONFIG_ENV}")
    s.set_defaults(func=cmd_serve, usage_error=s.error)

    s = sub.add_parser("demo", help="run a self-contained demo (mock provider, demo keys)",
                       description="Run the mock provider and the sidecar with a demo vault, key "
                       "pair, access key and config, created in --dir on first run; print a working "
                       "curl line. Ctrl-C stops everything. Port 0 picks a free port.")  # fmt: skip
    s.add_argument("--dir", default=".demo", metavar="DIR",
                   help="state folder for the demo's files (default .demo)")  # fmt: skip
    # String defaults go through `type` too, so the config module loads only for `demo`.
    s.add_argument("--listen", type=_address, default=_DEMO_LISTEN, metavar="ADDR",
                   help=f"proxy address (default {_DEMO_LISTEN})")  # fmt: skip
    s.add_argument("--admin-listen", type=_address, default=_DEMO_ADMIN_LISTEN, metavar="ADDR",
                   help=f"admin address (default {_DEMO_ADMIN_LISTEN})")  # fmt: skip
    s.add_argument("--mock-listen", type=_address, default=_DEMO_MOCK_LISTEN, metavar="ADDR",
                   help=f"mock provider address (default {_DEMO_MOCK_LISTEN})")  # fmt: skip
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("keygen", help="create the pod's key pair",
                       description="Write a new private key (mode 0600) and print its public key.")  # fmt: skip
    s.add_argument(
        "--private-key", required=True, metavar="PATH", help="where to write the private key"
    )
    s.set_defaults(func=cmd_keygen)

    v = sub.add_parser("vault", help="vault file commands").add_subparsers(
        dest="vault_command", metavar="COMMAND", required=True
    )
    s = v.add_parser("init", help="create an empty vault sealed to a public key",
                     description="Create an empty vault whose values will be sealed to PUBLIC_KEY.")  # fmt: skip
    vault_arg(s)
    s.add_argument(
        "--public-key", required=True, metavar="KEY", help="base64 public key from `keygen`"
    )
    s.set_defaults(func=cmd_vault_init)

    sec = sub.add_parser("secret", help="secrets referenced from the config").add_subparsers(
        dest="secret_command", metavar="COMMAND", required=True
    )
    s = sec.add_parser("set", help="seal stdin as secrets/NS/NAME",
                       description="Seal the value read from stdin into the vault as NS/NAME, for "
                       "${secrets.get('NS', 'NAME')} references. Needs only the public key.")  # fmt: skip
    vault_arg(s)
    s.add_argument("namespace", metavar="NS", type=_name("namespace"))
    s.add_argument("name", metavar="NAME", type=_name("name"))
    s.set_defaults(func=cmd_secret_set)
    s = sec.add_parser(
        "list",
        help="list secret names (never values)",
        description="List the namespaces and names of the sealed secrets. Values are never shown.",
    )
    vault_arg(s)
    s.set_defaults(func=cmd_secret_list)

    ak = sub.add_parser("access-key", help="access keys given to applications").add_subparsers(
        dest="ak_command", metavar="COMMAND", required=True
    )
    s = ak.add_parser("create", help="create an access key and print it once",
                      description="Create an access key. It is printed once on stdout and stored "
                      "only as a hash.")  # fmt: skip
    vault_arg(s)
    s.add_argument("name", metavar="NAME", type=_name("access key name"))
    s.add_argument(
        "--credits",
        type=_usd,
        default=0.0,
        metavar="USD",
        help="credit grant for managed keys (default 0)",
    )
    s.add_argument(
        "--allow-provider", action="append", metavar="P", help="restrict to provider P (repeatable)"
    )
    s.add_argument(
        "--allow-model",
        action="append",
        metavar="M",
        help="restrict to model M, `*` suffix allowed (repeatable)",
    )
    s.add_argument("--rpm", type=_rate_limit, metavar="N",
                   help="at most N requests per minute (default: unlimited)")  # fmt: skip
    s.add_argument("--tpm", type=_rate_limit, metavar="N",
                   help="at most N tokens per minute (default: unlimited)")  # fmt: skip
    s.set_defaults(func=cmd_access_key_create)
    s = ak.add_parser(
        "revoke",
        help="revoke an access key (effective at the next reload)",
        description="Mark an access key revoked. Running sidecars refuse it (401) after their next reload.",
    )
    vault_arg(s)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=cmd_access_key_revoke)
    s = ak.add_parser("set-credits", help="set an access key's credit grant in USD",
                      description="Set the credit grant. Remaining credits = grant - spent (the ledger keeps spend).")  # fmt: skip
    vault_arg(s)
    s.add_argument("name", metavar="NAME")
    s.add_argument("usd", metavar="USD", type=_usd)
    s.set_defaults(func=cmd_access_key_set_credits)
    s = ak.add_parser("set-limits", help="set an access key's requests and tokens per minute",
                      description="Set the rate limits of an access key: --rpm (requests per "
                      "minute) and --tpm (tokens per minute), each a whole number from 1 to "
                      f"{MAX_RATE_LIMIT} or `none` for unlimited. A limit not given is kept. "
                      "Running sidecars apply it at their next reload.")  # fmt: skip
    vault_arg(s)
    s.add_argument("name", metavar="NAME", type=_name("access key name"))
    s.add_argument("--rpm", type=_rate_limit_or_none, default=_KEEP, metavar="N|none",
                   help="requests per minute, or `none` (unlimited); default: keep")  # fmt: skip
    s.add_argument("--tpm", type=_rate_limit_or_none, default=_KEEP, metavar="N|none",
                   help="tokens per minute, or `none` (unlimited); default: keep")  # fmt: skip
    s.set_defaults(func=cmd_access_key_set_limits, usage_error=s.error)
    s = ak.add_parser(
        "list",
        help="names, scopes, credits, spend, limits, dates (never hashes or keys)",
        description="List access keys: name, status, credit grant, spent and remaining credits "
        "(read from the ledger of the config named by --config or $SIDECAR_CONFIG; `unknown` "
        "without one), rate limits (RPM, TPM; `-` for unlimited), allowed providers and "
        "models, number of attached keys, creation and revocation times. Never keys or hashes.",
    )
    vault_arg(s)
    s.add_argument("--config", metavar="PATH",
                   help=f"config whose ledger holds the spend (default ${CONFIG_ENV})")  # fmt: skip
    s.set_defaults(func=cmd_access_key_list)

    pk = sub.add_parser(
        "provider-key", help="provider keys attached to one access key"
    ).add_subparsers(dest="pk_command", metavar="COMMAND", required=True)
    s = pk.add_parser("attach", help="seal stdin and attach it to an access key",
                      description="Seal the provider key read from stdin and attach it to an access "
                      "key. The newest attached key of a provider is tried first. Prints the key id.")  # fmt: skip
    vault_arg(s)
    s.add_argument("--access-key", required=True, metavar="NAME")
    s.add_argument("--provider", required=True, metavar="P", type=_name("provider"))
    s.add_argument(
        "--id", metavar="ID", type=_name("key id"), help="non-secret id (default: generated)"
    )
    s.add_argument("--config", metavar="PATH",
                   help="config declaring the providers (default: the configs beside the vault "
                   "that use it); an unknown provider gets a warning")  # fmt: skip
    s.set_defaults(func=cmd_provider_key_attach)
    s = pk.add_parser(
        "detach",
        help="remove an attached key",
        description="Remove an attached provider key (by its id) from an access key.",
    )
    vault_arg(s)
    s.add_argument("--access-key", required=True, metavar="NAME")
    s.add_argument("--id", required=True, metavar="ID")
    s.set_defaults(func=cmd_provider_key_detach)
    s = pk.add_parser(
        "list",
        help="attached key ids, providers and times (never values)",
        description="List attached keys, newest first per access key: ids, providers, "
        "attach times. Never values.",
    )
    vault_arg(s)
    s.add_argument("--access-key", metavar="NAME")
    s.set_defaults(func=cmd_provider_key_list)

    s = sub.add_parser("migrate", help="move policy keys of built-in providers onto access keys",
                       description="Attach the policy keys of built-in providers to access keys "
                       "(all, or those named) and remove them from the config. Safe to re-run.")  # fmt: skip
    s.add_argument("--config", required=True, metavar="PATH")
    s.add_argument(
        "--access-key", action="append", metavar="NAME", help="only these access keys (repeatable)"
    )
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("check", help="validate config, vault, private key and references",
                       description="Validate the config, open every vault value with the private key, "
                       "resolve every reference; list every problem and exit 1 if any.")  # fmt: skip
    s.add_argument("--config", required=True, metavar="PATH")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("status", help="key health of a running sidecar, as a table",
                       description="Fetch GET /keys from a running sidecar's admin port and print "
                       "every key it knows: provider, source, key id, owning access key, model, "
                       "state (ok, cooling, dead), until (UTC), reason and last upstream status. "
                       "Never key values.")  # fmt: skip
    s.add_argument("--admin", default=_ADMIN_URL, metavar="URL",
                   help=f"the admin port's base URL (default {_ADMIN_URL})")  # fmt: skip
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("inject", help="add the sidecar to annotated pods (webhook, --dry-run)",
                       description="Serve the mutating admission webhook that adds the sidecar to "
                       "pods annotated ai-gateway-sidecar/inject: \"true\" (POST /mutate, GET "
                       "/healthz, over TLS); or, with --dry-run -f FILE, print FILE's manifests with "
                       "the sidecar injected, offline; or, with --make-certs DIR, write a self-signed "
                       "CA and the webhook's serving certificate and print the caBundle.")  # fmt: skip
    s.add_argument("--listen", type=_address, default=_INJECT_LISTEN, metavar="ADDR",
                   help=f"webhook address (default {_INJECT_LISTEN})")  # fmt: skip
    s.add_argument(
        "--tls-cert", metavar="PATH", help="serving certificate (PEM), re-read when it changes"
    )
    s.add_argument("--tls-key", metavar="PATH", help="its private key (PEM)")
    s.add_argument("--image", type=_image, metavar="IMAGE",
                   help="sidecar image when the pod does not name one (default: this version's)")  # fmt: skip
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="inject into the manifests of -f FILE and print them; no cluster needed")  # fmt: skip
    mode.add_argument("--make-certs", metavar="DIR",
                      help="write ca.crt, tls.crt, tls.key into DIR and print the caBundle")  # fmt: skip
    s.add_argument(
        "-f", "--filename", metavar="FILE", help="with --dry-run: manifests (YAML), - for stdin"
    )
    s.add_argument("--service", type=_dns_label, default=_INJECT_SERVICE, metavar="NAME",
                   help=f"with --make-certs: the webhook's Service (default {_INJECT_SERVICE})")  # fmt: skip
    s.add_argument("--namespace", type=_dns_label, default=_INJECT_NAMESPACE, metavar="NS",
                   help=f"with --make-certs: its namespace (default {_INJECT_NAMESPACE})")  # fmt: skip
    s.add_argument("--days", type=_days, default=365, metavar="N",
                   help="with --make-certs: validity in days (default 365)")  # fmt: skip
    s.set_defaults(func=cmd_inject, usage_error=s.error)

    s = sub.add_parser("mock-provider", help="a local OpenAI + Anthropic look-alike",
                       description="Serve a local OpenAI + Anthropic look-alike for demos and CI. "
                       "Failures are provoked by directives in the key or model, e.g. `fail-429`, "
                       "`fail-500`, `drop`, `slow-200`, `break`.")  # fmt: skip
    s.add_argument("--listen", default="127.0.0.1:8089", metavar="ADDR")
    s.set_defaults(func=cmd_mock_provider)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"error: {exc.source}:\n" + problems_text(exc.problems), file=sys.stderr)
        return 1
    except (UserError, VaultError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
