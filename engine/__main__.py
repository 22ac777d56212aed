"""``python -m engine``: the operator commands (see ``engine._cli``)."""

if __name__ == "__main__":
    from ._cli import main

    raise SystemExit(main())
