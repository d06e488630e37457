"""Serve an OpenVLA checkpoint over HTTP (`POST /act`, `GET /health`), with dynamic batching.

  python scripts/serve.py --checkpoint=path/to/openvla-7b --port=8000 --max_batch=16 --max_wait_ms=5

The checkpoint is an HF OpenVLA directory or a `scripts/convert.py to-jax` one, with tokenizer.model.
Before serving, every (batch, prompt length) bucket up to --max_batch and --max_prompt_tokens is
compiled (a progress bar on stderr; GET /health answers 503 meanwhile), so no request waits on the
compiler; then the line `serving on <url>` is printed. Binds 127.0.0.1 unless --host says otherwise;
elsewhere set a token (OPENVLA_SERVE_TOKEN, or --token) that clients send as `Authorization: Bearer
<token>`. `--port=0` picks a free port. Request format and limits: openvla_jax/serving/server.py.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_string("checkpoint", None, "HF or converted OpenVLA directory", required=True)
flags.DEFINE_string("host", "127.0.0.1", "address to bind; 0.0.0.0 exposes the server (set a token)")
flags.DEFINE_integer("port", 8000, "port to bind (0: any free port)")
flags.DEFINE_integer("max_batch", 8, "most requests per model call; 1 turns batching off")
flags.DEFINE_float("max_wait_ms", 5.0, "longest a request waits for others to batch with")
flags.DEFINE_string("dtype", "bfloat16", "parameter and compute dtype (bfloat16, float32)")
flags.DEFINE_integer("max_body_mb", 32, "largest request body accepted (413 above)")
flags.DEFINE_integer("max_prompt_tokens", 128, "longest prompt accepted (400 above); compiled up to this")
flags.DEFINE_bool("warmup", True, "compile every (batch, prompt length) bucket before accepting requests")
flags.DEFINE_string("token", None, "bearer token every request must carry (default: $OPENVLA_SERVE_TOKEN)")
flags.DEFINE_integer("max_connections", 256, "open connections at most (503 above)")
flags.DEFINE_float("header_timeout_s", 10.0, "a request head must arrive within this (else the connection closes)")
flags.DEFINE_float("body_timeout_s", 30.0, "a request body must arrive within this (else 408)")
flags.DEFINE_bool("access_log", False, "log every request")
flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "persistent XLA cache: a restart loads the compiled buckets instead of compiling them again "
    "(default: $OPENVLA_JAX_COMPILATION_CACHE; unset: no cache)",
)
flags.DEFINE_enum(
    "image_resize",
    None,
    ["processor", "train", "train_jpeg"],
    "how frames become pixels (default: what the checkpoint records; models/preprocess.py)",
)
flags.DEFINE_float("center_crop", None, "center crop area fraction at inference (default: the checkpoint's)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from openvla_jax.policy import OpenVLA
    from openvla_jax.serving.server import ActionServer
    from openvla_jax.utils.compile_cache import enable_compilation_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cache = enable_compilation_cache(FLAGS.compilation_cache_dir)
    vla = OpenVLA.load(
        FLAGS.checkpoint, dtype=FLAGS.dtype, image_resize=FLAGS.image_resize, center_crop=FLAGS.center_crop
    )
    server = ActionServer(
        vla,
        host=FLAGS.host,
        port=FLAGS.port,
        max_batch=FLAGS.max_batch,
        max_wait_ms=FLAGS.max_wait_ms,
        max_body_bytes=FLAGS.max_body_mb << 20,
        access_log=FLAGS.access_log,
        max_prompt_tokens=min(FLAGS.max_prompt_tokens, vla.max_prompt_tokens),
        warmup=FLAGS.warmup,
        token=FLAGS.token or os.environ.get("OPENVLA_SERVE_TOKEN") or None,
        max_connections=FLAGS.max_connections,
        header_timeout_s=FLAGS.header_timeout_s,
        body_timeout_s=FLAGS.body_timeout_s,
    )
    print(
        f"listening on {server.url}; compiling {len(server.buckets)} buckets before serving"
        + (f" (compilation cache: {cache})" if cache else ""),
        flush=True,
    )
    try:
        server.start()  # returns once compiled; raises naming the cause if compiling failed
    except BaseException:
        server.stop()
        raise
    print(
        f"serving on {server.url} (max_batch={server.max_batch}, max_wait_ms={server.max_wait_ms}, "
        f"datasets={sorted(vla.norm_stats)})",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    app.run(main)
