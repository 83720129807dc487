"""`flywheel serve` (alias `vllm-serve`): start the engine workers, then the HTTP server."""

from __future__ import annotations

import logging
import signal

from flywheel.server.options import ServerOptions, parse_options

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.DEBUG if options.log_level == "trace" else options.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(options)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised the way Ctrl+C raises KeyboardInterrupt, so that both stop the engine workers."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def serve(options: ServerOptions) -> int:
    """Run the server until SIGINT/SIGTERM; the workers are stopped on the way out."""
    import uvicorn
    from transformers import AutoConfig, AutoTokenizer

    from flywheel.server.app import ServerState, create_app
    from flywheel.server.workers import WorkerPool

    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can generate and replace "
                       "the weights; set --api_key or FLYWHEEL_API_KEY", options.host)
    # The workers are not daemons: leaving without stopping them would leave them running (SIGTERM's
    # default) or wait for them forever (multiprocessing joins them at exit).
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    pool = WorkerPool(options)
    try:
        from_checkpoint = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(options.model, **from_checkpoint)
        config = AutoConfig.from_pretrained(options.model, **from_checkpoint)
        vocab_size = config.get_text_config().vocab_size
        try:
            pool.start()
        except (RuntimeError, TimeoutError, ValueError) as error:
            logger.error("%s", error)
            return 1
        logger.info("%d engine(s) of tensor_parallel_size %d ready; serving http://%s:%d (OpenAPI at /docs)",
                    options.data_parallel_size, options.tensor_parallel_size, options.host, options.port)
        app = create_app(ServerState(options, pool, tokenizer, vocab_size))
        server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port,
                                               log_level="trace" if options.log_level == "trace" else options.log_level,
                                               timeout_graceful_shutdown=10))
        try:
            server.run()
        except KeyboardInterrupt:
            pass  # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again for the handler it replaced
        return 0 if server.started else 1
    except KeyboardInterrupt as interrupt:
        logger.warning("interrupted; stopping the engine workers")
        return 128 + (signal.SIGTERM if isinstance(interrupt, _Terminated) else signal.SIGINT)
    finally:
        pool.shutdown()
        signal.signal(signal.SIGTERM, previous_sigterm)
