"""`python -m store users ...`: the accounts `python app.py --auth` signs people in with.

    python -m store users add NAME --role annotator|admin   # asks for the password twice
    echo "$PASSWORD" | python -m store users add NAME --role admin --password-stdin
    python -m store users list [--json]                      # never shows a password or its hash
    python -m store users disable NAME                       # and `enable NAME`
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from store.accounts import ROLES, AccountError
from store.db import Store


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        # One line: a script's `echo` or a secret manager's output; only the line ending is not the password.
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"Password for {args.name}: ")
    if getpass.getpass("The same password again: ") != first:
        raise AccountError("The two passwords differ: nothing was saved.")
    return first


def _add(store: Store, args: argparse.Namespace) -> int:
    try:
        user = store.add_user(args.name, args.role, _read_password(args))
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"added {user['role']} {user['name']!r}")
    return 0


def _list(store: Store, args: argparse.Namespace) -> int:
    users = store.users()
    if args.json:
        print(json.dumps([{**u, "disabled": bool(u["disabled"])} for u in users], indent=2))
        return 0
    if not users:
        print("no accounts yet: python -m store users add NAME --role admin")
        return 0
    width = max(len("name"), *(len(u["name"]) for u in users))
    print(f"{'name':<{width}}  {'role':<9}  {'status':<8}  created")
    for u in users:
        status = "disabled" if u["disabled"] else "active"
        print(f"{u['name']:<{width}}  {u['role']:<9}  {status:<8}  {u['created_at']}")
    return 0


def _set_disabled(disabled: bool):
    def run(store: Store, args: argparse.Namespace) -> int:
        try:
            (store.disable_user if disabled else store.enable_user)(args.name)
        except AccountError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{'disabled' if disabled else 'enabled'} {args.name!r}")
        return 0
    return run


def add_users_command(commands, common: list[argparse.ArgumentParser]) -> None:
    """Register `users` and its subcommands under `python -m store`."""
    users = commands.add_parser("users", help="accounts for --auth: add, list, disable, enable",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=common, help="a new account (the password is asked for, never an argument)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="annotator", help="default: %(default)s")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input (one line) instead of asking twice")
    add.set_defaults(run=_add)
    listing = actions.add_parser("list", parents=common, help="the accounts, their roles and status")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=_list)
    for name, disabled in (("disable", True), ("enable", False)):
        action = actions.add_parser(name, parents=common,
                                    help="stop an account signing in (its votes keep its name)" if disabled
                                    else "let a disabled account sign in again")
        action.add_argument("name")
        action.set_defaults(run=_set_disabled(disabled))
