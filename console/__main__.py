"""``python -m console --host --port``: serve the review console with uvicorn.

``run(host, port)`` is the same entry point for ``modgate console`` (worker/cli.py).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modgate.settings import Settings, load_settings


def run(
    host: str = "127.0.0.1", port: int = 8080, settings: Settings | None = None, config: Path | None = None
) -> None:
    """Serve the console until interrupted; settings from env / ``config`` unless given."""
    import uvicorn

    from console.app import create_app

    settings = settings if settings is not None else load_settings(config)
    if not settings.console.tokens and not settings.console.trust_proxy_header:
        logging.getLogger(__name__).warning(
            "no reviewer can log in: set MODGATE_CONSOLE__TOKENS or MODGATE_CONSOLE__TRUST_PROXY_HEADER"
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", proxy_headers=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m console", description="The modgate review console.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (else MODGATE_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args.host, args.port, config=args.config)


if __name__ == "__main__":
    main()
