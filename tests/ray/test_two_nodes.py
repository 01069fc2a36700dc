"""Two Ray nodes that share nothing but an S3 server: network namespaces joined by a veth pair (test hosts of our
own, 10.78.0.1 and 10.78.0.2, 2 CPUs each: with one, a worker per node leaves no whole CPU for Ray Data's
read tasks), each node with a private /tmp (its Ray session, unpacked job working
dirs and model cache), moto's S3 server on the head's address as the only shared storage. The whole path runs by
`ray job submit`: vocab → preprocess → pretrain (one worker per node) → score (one actor per node) → evaluate (a
Tune trial per node) → a Serve app with one replica per node; then the faults: the second node killed during pretraining (the job finishes from the
latest checkpoint after the node rejoins) and during scoring (a --resume run scores every id exactly once).

Needs root (namespaces, mounts); skipped elsewhere.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_PATH, can_make_namespaces

pytestmark = pytest.mark.ray

HEAD, WORKER = "jbsnA", "jbsnB"
HEAD_IP, WORKER_IP = "10.78.0.1", "10.78.0.2"
S3 = f"{HEAD_IP}:9000"
JGLUE_SAMPLE = REPO / "jbert_ray" / "sample" / "jglue"
DASHBOARD = f"http://{HEAD_IP}:8265"
BIN = Path(sys.executable).parent
NODE_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "JBERT_CACHE_DIR")},
    "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # a job's `python` is the first on the node's PATH
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_ENDPOINT_URL": f"http://{S3}",  # plain s3:// URIs below: the endpoint comes from the environment
    "JBERT_CACHE_DIR": "/tmp/jbert_cache",  # under the node's private /tmp
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class TwoNodes:
    """The namespaces, the S3 server and the two Ray nodes; every process is stopped by the pids of its namespace."""

    def __init__(self, root: Path):
        self.root = root
        self.private_tmp = {HEAD: root / "head_tmp", WORKER: root / "worker_tmp"}

    def up(self) -> None:
        self.remove_namespaces()  # left over by a run that was killed before its teardown
        for namespace in (HEAD, WORKER):
            _ip("netns", "add", namespace)
            self.private_tmp[namespace].mkdir(parents=True, exist_ok=True)
        _ip("link", "add", "jbsnvA", "type", "veth", "peer", "name", "jbsnvB")
        for namespace, link, address in ((HEAD, "jbsnvA", HEAD_IP), (WORKER, "jbsnvB", WORKER_IP)):
            _ip("link", "set", link, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "link", "set", link, "up")
        server = ("import logging, time; from moto.server import ThreadedMotoServer; "
                  "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
                  f"ThreadedMotoServer(ip_address='{HEAD_IP}', port=9000, verbose=False).start(); time.sleep(1e9)")
        self.s3 = subprocess.Popen(["ip", "netns", "exec", HEAD, sys.executable, "-c", server], env=NODE_ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.python_in_head(
            "import pyarrow.fs as fs, time\n"
            "for _ in range(100):\n"
            "    try:\n"
            f"        fs.S3FileSystem(endpoint_override='{S3}', scheme='http', allow_bucket_creation=True)"
            ".create_dir('two-nodes'); break\n"
            "    except OSError: time.sleep(0.2)\n"
        )
        self.start_node(HEAD, "--head", f"--node-ip-address={HEAD_IP}", "--port=6379",
                        f"--dashboard-host={HEAD_IP}", "--dashboard-port=8265")  # fmt: skip
        self.start_node(WORKER, f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}")

    def start_node(self, namespace: str, *ray_args: str) -> None:
        """`ray start` in the node's namespace with its own /tmp (a mount namespace) and host name."""
        # Gloo finds its address through the host name, which resolves to 127.0.0.1 here: name the interface.
        link = "jbsnvA" if namespace == HEAD else "jbsnvB"
        command = (f"hostname {namespace} && export GLOO_SOCKET_IFNAME={link} && "
                   f"mount --bind {self.private_tmp[namespace]} /tmp && "
                   f"exec {BIN}/ray start --num-cpus=2 --disable-usage-stats {' '.join(ray_args)}")  # fmt: skip
        result = subprocess.run(["ip", "netns", "exec", namespace, "unshare", "-m", "-u", "sh", "-c", command],
                                env=NODE_ENV, capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    def kill(self, namespace: str) -> None:
        """SIGKILL every process of a node, as when the machine is lost."""
        pids = _ip("netns", "pids", namespace, check=False).stdout.split()
        for pid in pids:
            if namespace == HEAD and int(pid) == self.s3.pid:
                continue
            subprocess.run(["kill", "-9", pid], capture_output=True, check=False)

    def down(self) -> None:
        self.s3.kill()
        self.remove_namespaces()

    @staticmethod
    def remove_namespaces() -> None:
        """Kill every process of both namespaces (by their pids), then delete them with their veth pair."""
        for namespace in (WORKER, HEAD):
            for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True, check=False)
        time.sleep(1)
        for namespace in (WORKER, HEAD):
            _ip("netns", "del", namespace, check=False)

    def python_in_head(self, code: str, timeout: float = 120) -> str:
        """Run Python in the head's network namespace (but not its private /tmp: it sees the test's files)."""
        result = subprocess.run(["ip", "netns", "exec", HEAD, sys.executable, "-c", code], env=NODE_ENV,
                                capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def store(self, call: str):
        """The JSON result of `call` on a Store of the shared bucket, e.g. `Store('s3://two-nodes/run').files()`."""
        code = f"import json; from jbert_ray.storage import Store; print(json.dumps({call}))"
        return json.loads(self.python_in_head(code).strip().splitlines()[-1])

    def ray_cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job …` against the head's dashboard, run from the head's namespace."""
        command = ["ip", "netns", "exec", HEAD, str(BIN / "ray"), "job", *args[:1], "--address", DASHBOARD, *args[1:]]
        return subprocess.run(command, env=NODE_ENV, capture_output=True, text=True, timeout=timeout, check=False)

    def submit(self, *job: str, wait: bool = True, check: bool = True) -> subprocess.CompletedProcess:
        submit = ["submit", "--working-dir", str(REPO), *([] if wait else ["--no-wait"]), "--", "python", "-m", *job]
        deadline = time.time() + 240
        while True:  # the head's job agent comes up seconds after `ray start` returns
            result = self.ray_cli(*submit)
            if "No available agent" not in result.stderr or time.time() > deadline:
                break
            time.sleep(2)
        if check:
            assert result.returncode == 0 and ("succeeded" in result.stdout or not wait), (
                result.stdout + result.stderr)[-3000:]  # fmt: skip
        return result

    def job_id(self, submitted: subprocess.CompletedProcess) -> str:
        return next(w.strip("'\"") for w in submitted.stdout.split() if w.strip("'\"").startswith("raysubmit_"))

    def wait_job(self, job_id: str, timeout: float = 400) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.ray_cli("status", job_id).stdout
            ended = re.search(r"Job '\S+' (?:was )?(succeeded|failed|stopped)", status)  # else "is running"…
            if ended:
                return ended.group(1)
            time.sleep(2)
        raise AssertionError(f"job {job_id} did not end within {timeout} s")


_STARTED = time.monotonic()


def _mark(phase: str) -> None:
    """Where the minutes go (shown with -s, or under a failure)."""
    print(f"[two nodes] {phase}: {time.monotonic() - _STARTED:.0f} s", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def nodes():
    if not can_make_namespaces():
        pytest.skip("needs root to make network and mount namespaces")
    root = Path(tempfile.mkdtemp(prefix="jbsn", dir="/var/tmp"))  # outside /tmp: each node mounts its own /tmp
    cluster = TwoNodes(root)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def test_the_whole_path_and_its_faults_on_two_nodes_sharing_only_object_storage(nodes, tmp_path):
    lines = SAMPLE_PATH.read_text(encoding="utf-8").splitlines(keepends=True)[:1500]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(lines), encoding="utf-8")
    nodes.store(f"Store('s3://two-nodes/corpus').upload({str(tmp_path)!r}) or 0")
    bucket = "s3://two-nodes"

    _mark("corpus uploaded")

    nodes.submit("jobs.vocab", "--input", f"{bucket}/corpus/", "--out", f"{bucket}/tokenizer",
                 "--vocab-size", "2000", "--no-progress")  # fmt: skip
    assert "tokenizer/vocab.txt" in nodes.store(f"Store('{bucket}').files('tokenizer')")

    _mark("vocab done")

    nodes.submit("jobs.preprocess", "--input", f"{bucket}/corpus/", "--tokenizer", f"{bucket}/tokenizer",
                 "--out", f"{bucket}/shards", "--max-seq-len", "64", "--valid-fraction", "0.1", "--no-progress")
    manifest = nodes.store(f"Store('{bucket}/shards').read_json('manifest.json')")
    assert manifest["records_read"] == 1500 and manifest["sequences"] > 0

    _mark("preprocess done")

    # Pretraining, one worker per node; the second node is lost after a checkpoint and comes back.
    submitted = nodes.submit(
        "jobs.pretrain", "--data", f"{bucket}/shards", "--out", f"{bucket}/run", "--model-config", "tiny",
        "--num-workers", "2", "--max-steps", "40", "--global-batch-size", "16", "--micro-batch-size", "8",
        "--checkpoint-every", "10", "--log-every", "5", "--eval-every", "1000", "--max-failures", "3",
        "--no-progress", wait=False,
    )  # fmt: skip
    job = nodes.job_id(submitted)
    deadline = time.time() + 300
    while not nodes.store(f"Store('{bucket}/run').read_json('progress.json', {{}})") and time.time() < deadline:
        time.sleep(0.5)
    hosts = {nodes.store(f"Store('{bucket}/run').read_json('workers/rank_{r}.json')")["host"] for r in (0, 1)}
    checkpointed = nodes.store(f"Store('{bucket}/run').read_json('progress.json')")["step"]
    _mark("checkpoint seen")
    nodes.kill(WORKER)
    time.sleep(1)
    nodes.start_node(WORKER, f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}")
    _mark("node B back")
    assert nodes.wait_job(job) == "succeeded"
    restarted = [nodes.store(f"Store('{bucket}/run').read_json('workers/rank_{r}.json')") for r in (0, 1)]
    assert all(40 > w["start_step"] >= checkpointed >= 10 for w in restarted), (restarted, checkpointed)
    rows = nodes.store(f"Store('{bucket}/run').read_text('metrics.csv')").splitlines()
    assert [int(float(r.split(",")[0])) for r in rows[1:]] == list(range(5, 45, 5))  # each step once
    assert hosts == {HEAD, WORKER}  # one worker per node (the restarted group may start before the node is back)
    _mark("pretraining done")

    # Scoring, one actor per node; the second node is lost midway, then a --resume run finishes the job.
    score = ["jobs.score", "--input", f"{bucket}/corpus/", "--model", f"{bucket}/run/model", "--out",
             f"{bucket}/scores", "--num-actors", "2", "--rows-per-part", "50", "--no-progress"]  # fmt: skip
    job = nodes.job_id(nodes.submit(*score, wait=False))
    deadline = time.time() + 300
    while len(nodes.store(f"Store('{bucket}/scores').files('parts')")) < 3 and time.time() < deadline:
        time.sleep(1)
    _mark("parts seen")
    nodes.kill(WORKER)
    nodes.ray_cli("stop", job, timeout=120)
    nodes.wait_job(job)
    assert not nodes.store(f"Store('{bucket}/scores').exists('summary.json')")  # the fault hit mid-run
    nodes.start_node(WORKER, f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}")
    _mark("node B back")
    nodes.submit(*score, "--resume")
    ids = json.loads(nodes.python_in_head(
        "import json, pyarrow.parquet as pq, pyarrow.fs as fs\n"
        f"s3 = fs.S3FileSystem(endpoint_override='{S3}', scheme='http')\n"
        "infos = s3.get_file_info(fs.FileSelector('two-nodes/scores/parts'))\n"
        "ids = [i for f in infos if f.path.endswith('.parquet')"
        " for i in pq.read_table(f.path, filesystem=s3, columns=['id']).column('id').to_pylist()]\n"
        "print(json.dumps(ids))").strip().splitlines()[-1])  # fmt: skip
    assert len(ids) == len(set(ids)) == 1500  # every id exactly once
    _mark("scoring resumed")

    # JGLUE evaluation from the store: one 2-CPU trial per node at once, data and model read from s3://.
    nodes.store(f"Store('{bucket}/jglue').upload({str(JGLUE_SAMPLE)!r}) or 0")
    nodes.submit("jobs.evaluate", "--model", f"{bucket}/run/model", "--data", f"{bucket}/jglue", "--out",
                 f"{bucket}/eval", "--tasks", "jsts", "--seeds", "0,1", "--learning-rates", "1e-4", "--epochs", "1",
                 "--max-train-examples", "32", "--cpus-per-trial", "2", "--no-progress")  # fmt: skip
    evaluated = nodes.store(f"Store('{bucket}/eval').read_json('results.json')")
    assert len(evaluated["trials"]) == 2 and {t["node_ip"] for t in evaluated["trials"]} == {HEAD_IP, WORKER_IP}
    _mark("evaluated")

    # Serving: one replica per node (each takes a node's 2 CPUs), the model fetched from the store by each node.
    # Test hosts of our own namespaces: no token (a replica reads it from its node's environment).
    served = nodes.submit("jbert_ray.cli", "serve", "--model", f"{bucket}/run/model", "--host", HEAD_IP,
                          "--allow-unauthenticated", "--min-replicas", "2", "--max-replicas", "2",
                          "--replica-cpus", "2", wait=False)  # fmt: skip
    answer = nodes.python_in_head(
        "import json, time, requests\n"
        "for _ in range(150):\n"
        "    try:\n"
        f"        r = requests.post('http://{HEAD_IP}:8000/fill-mask', json={{'text': '東京は日本の[MASK]です。'}}, "
        "timeout=10)\n"
        "        if r.status_code == 200: break\n"
        "    except requests.RequestException: pass\n"
        "    time.sleep(1)\n"
        "print(json.dumps([r.status_code, r.json()]))", timeout=300)  # fmt: skip
    _mark("served")
    nodes.ray_cli("stop", nodes.job_id(served), timeout=120)
    status, body = json.loads(answer.strip().splitlines()[-1])
    assert status == 200 and json.dumps(body["predictions"]).count('"token"') >= 5, body
