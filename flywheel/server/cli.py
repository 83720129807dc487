"""`flywheel serve` (alias `vllm-serve`): start the engine workers, then the HTTP server."""

from __future__ import annotations

import logging

from flywheel.server.options import ServerOptions, parse_options

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.DEBUG if options.log_level == "trace" else options.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(options)


def serve(options: ServerOptions) -> int:
    """Run the server until SIGINT/SIGTERM; the workers are stopped on the way out."""
    import uvicorn
    from transformers import AutoConfig, AutoTokenizer

    from flywheel.server.app import ServerState, create_app
    from flywheel.server.workers import WorkerPool

    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can generate and replace "
                       "the weights; set --api_key or FLYWHEEL_API_KEY", options.host)
    tokenizer = AutoTokenizer.from_pretrained(options.model, revision=options.revision)
    config = AutoConfig.from_pretrained(options.model, revision=options.revision)
    vocab_size = config.get_text_config().vocab_size
    pool = WorkerPool(options)
    try:
        pool.start()
    except (RuntimeError, TimeoutError, ValueError) as error:
        logger.error("%s", error)
        return 1
    logger.info("%d engine(s) of tensor_parallel_size %d ready; serving http://%s:%d (OpenAPI at /docs)",
                options.data_parallel_size, options.tensor_parallel_size, options.host, options.port)
    try:
        app = create_app(ServerState(options, pool, tokenizer, vocab_size))
        server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port,
                                               log_level="trace" if options.log_level == "trace" else options.log_level,
                                               timeout_graceful_shutdown=10))
        server.run()
        return 0 if server.started else 1
    finally:
        pool.shutdown()
