"""Load test: the original and the rewritten all-MiniLM-L6-v2 served side by side by Triton, on loopback.

One ``tritonserver`` (``deploy/triton/``, ONNX Runtime backend, CPU) serves both models from one
repository written by ``python -m tardis_onnx triton`` (dynamic batching up to 8, one instance each).
Clients (threads, each with its own HTTP client) send one real STS-B sentence of 12 tokens per
request, as fast as answers come back, at each concurrency level for a fixed time, the two models
taking turns level by level. Reported per model and level: requests/s, p50 and p99 latency, failed
requests. Then a soak: concurrent clients for ``--soak`` seconds on the rewritten model, every answer
checked against the in-process ONNX Runtime session's for the same input.

    python benchmarks/triton_load.py --out out/triton_load                     # about 6 min on 2 cores
    python benchmarks/triton_load.py --seconds 3 --soak 10 --levels 1 4       # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # models/
sys.path.insert(0, str(ROOT / "deploy" / "triton"))

from server import start  # noqa: E402

from experiments.data import data_dir  # noqa: E402
from experiments.evaluate import STSB, read_stsb  # noqa: E402
from models.minilm import export_minilm  # noqa: E402
from tardis_onnx import optimize, text, triton  # noqa: E402
from tardis_onnx.errors import TardisError, non_negative_float, positive_int, run_command  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import check_output_folders, make_output_folders  # noqa: E402
from tardis_onnx.session import create_session  # noqa: E402

OUTPUT = "last_hidden_state"
TOKENS = 12


def requests_for(source: Path, data: Path, count: int = 64) -> list[dict[str, np.ndarray]]:
    """``count`` single-sentence inputs of ``TOKENS`` tokens from STS-B dev."""
    tokenizer = text.load_tokenizer(source.parent)
    first, second, _ = read_stsb(data / STSB)
    long_enough = [s for s in sorted(set(first) | set(second)) if len(tokenizer(s)["input_ids"]) >= TOKENS]
    return text.text_feeds(tokenizer, long_enough[:count], onnx.load(source), samples=count, seq_len=TOKENS, batch=1)


def infer(client, model: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import tritonclient.http as http

    inputs = []
    for name, array in feeds.items():
        tensor = http.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array.astype(np.int64))
        inputs.append(tensor)
    return client.infer(model, inputs, outputs=[http.InferRequestedOutput(OUTPUT)]).as_numpy(OUTPUT)


def drive(url: str, model: str, feeds: list[dict], clients: int, seconds: float, expected=None) -> dict:
    """``clients`` threads sending requests for ``seconds``; latencies, failures and (with ``expected``)
    answers that differ from the in-process result."""
    import tritonclient.http as http

    latencies: list[float] = []
    failures, mismatches = [0], [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(offset: int) -> None:
        client = http.InferenceServerClient(url, connection_timeout=30, network_timeout=60)
        k = offset
        while time.perf_counter() < deadline:
            feed = feeds[k % len(feeds)]
            t0 = time.perf_counter()
            try:
                got = infer(client, model, feed)
            except Exception:  # a failed request is counted, never hidden
                with lock:
                    failures[0] += 1
                continue
            elapsed = time.perf_counter() - t0
            wrong = expected is not None and not np.allclose(got, expected[k % len(feeds)], rtol=1e-5, atol=1e-5)
            with lock:
                latencies.append(elapsed)
                mismatches[0] += int(wrong)
            k += clients

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return {
        "clients": clients,
        "requests": len(latencies),
        "failed": failures[0],
        "mismatched": mismatches[0],
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $TARDIS_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("out/triton_load"))
    ap.add_argument("--levels", type=positive_int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    ap.add_argument("--seconds", type=non_negative_float, default=20.0, help="per model and level")
    ap.add_argument(
        "--soak", type=non_negative_float, default=180.0, help="seconds of checked load on the rewritten model"
    )
    ap.add_argument("--soak-clients", type=positive_int, default=8)
    return ap


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out)  # before any work
    data = data_dir(args.data)
    source = export_minilm()
    feeds = requests_for(source, data)
    rows, soak = [], None
    with tempfile.TemporaryDirectory(prefix="tardis-triton-") as tmp:
        folder = Path(tmp)
        rewritten = folder / "minilm.tardis.onnx"
        if optimize.main([str(source), "-o", str(rewritten), "-q"]):
            raise TardisError("optimize failed")
        session = create_session(rewritten, optimization="all")
        expected = [session.run([OUTPUT], f)[0] for f in feeds]
        models = {"dense": ("minilm", source), "tardis": ("minilm_tardis", rewritten)}
        for name, path in models.values():
            if triton.main([str(path), "--out", str(folder / "repo"), "--name", name]):
                raise TardisError("writing the repository failed")
        with start(folder / "repo") as server:
            for clients in args.levels:
                for label, (name, _) in models.items():
                    row = {"model": label, **drive(server.http_url, name, feeds, clients, args.seconds)}
                    rows.append(row)
                    print(
                        f"{label:<7} clients {clients:>2}: {row['requests_per_s']:7.1f} req/s, "
                        f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, failed {row['failed']}",
                        flush=True,
                    )
            if args.soak > 0:
                soak = drive(server.http_url, "minilm_tardis", feeds, args.soak_clients, args.soak, expected)
                print(
                    f"soak: {soak['requests']} requests in {args.soak:.0f} s from {args.soak_clients} clients, "
                    f"failed {soak['failed']}, answers different from the in-process session {soak['mismatched']}",
                    flush=True,
                )
    meta = {"model": "all-MiniLM-L6-v2, 1 sentence x 12 tokens per request", "seconds": args.seconds}
    make_output_folders(args.out)
    with StagedWrites() as staged:
        staged.write_text(
            args.out / "triton_load.json", json.dumps({"meta": meta, "rows": rows, "soak": soak}, indent=2) + "\n"
        )
    print(f"wrote {args.out / 'triton_load.json'}")
    failed = sum(r["failed"] for r in rows) + (soak["failed"] + soak["mismatched"] if soak else 0)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
