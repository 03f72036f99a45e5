"""Two network-namespaced hosts on this machine (`launch/local_cluster.py`), DeepSpeed's launcher on each, one
rank per host, talking over the hosts' veth link (never loopback): data parallel replicas on different hosts
write one output folder, PP2 prefill -> TP2 decode spans both hosts, and a host lost mid-job (kill -9 of every
process in its namespace) ends the job within 60 s, leaves no /dev/shm file, and a rerun resumes with every
row exactly once. Tokens equal Hugging Face greedy generate (which one process also matches).

Placement at start-up: a TP group across the hosts is refused (one `error:` line, exit 2, before any weight
loads) unless `engine.allow_cross_node_tp` is true; the hosts share this machine's /dev/shm, so a switching
pair across them may run (with the opt-in), but not once each host mounts a /dev/shm of its own, as separate
machines have.

Needs root and network namespaces; elsewhere these tests skip and say why (the bad-input and node-key tests
run everywhere)."""
import glob
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from seesaw_ds.distributed import node
from tests.launch.conftest import GENERATE, REPO, free_port, job_env, recipe_dict, write_recipe
from tests.launch.test_multi_rank import assert_rows_match, output_rows

LOCAL_CLUSTER = os.path.join(REPO, "launch", "local_cluster.py")
LOST_HOST_LIMIT_S = 60


def load_tool():
    spec = importlib.util.spec_from_file_location("local_cluster", LOCAL_CLUSTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host the test cluster, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root, e.g. on the project's CI machine)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"sswprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    return None


needs_namespaces = pytest.mark.skipif(namespaces_unavailable() is not None,
                                      reason=f"no namespaced hosts: {namespaces_unavailable()}")


def cluster_command(prefix, port, recipe, hosts=2, private_shm=False, link=None, ranks=1):
    """`private_shm`: every host mounts a /dev/shm of its own (as separate machines), shared by its ranks;
    else the hosts share this machine's. `link`: the hosts' link rate (e.g. "200mbit")."""
    options = (["--link", link] if link else []) + (["--private-shm"] if private_shm else [])
    return [sys.executable, LOCAL_CLUSTER, "--hosts", str(hosts), "--ranks", str(ranks), "--prefix", prefix,
            "--master_port", str(port), *options, "--", GENERATE, "--config", recipe]


def error_lines(log):
    return [line for line in log.splitlines() if "error:" in line]


def run_cluster(cmd, env, timeout=600, expect=0):
    """Run the tool to completion; on a timeout, Ctrl-C it (it then tears its hosts down) before failing."""
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGINT)
        log, _ = job.communicate(timeout=60)
        pytest.fail(f"the cluster run took over {timeout} s:\n{log[-3000:]}")
    assert job.returncode == expect, f"exit {job.returncode}\n{log[-4000:]}"
    return log


def leftovers(prefix, port):
    """Namespaces and /dev/shm files of a cluster that should all be gone."""
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in spaces.splitlines() if line.startswith(prefix + "-")]
    ports = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") if port else []
    return names + glob.glob(f"/dev/shm/*-{prefix}-h*") + ports


def new_prefix():
    return f"t{secrets.token_hex(3)}"


# ---- everywhere --------------------------------------------------------------------------------------------
def test_node_key_is_explicit_or_host_and_network_namespace(monkeypatch):
    monkeypatch.setenv(node.NODE_KEY_ENV, "job 7/h1")
    assert node.node_key() == "job_7_h1"
    monkeypatch.delenv(node.NODE_KEY_ENV)
    key = node.node_key()
    assert key and key.endswith(node.network_namespace_id()) and "/" not in key


def test_shm_domain_is_the_boot_and_the_device_else_the_node_key(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    domain = node.shm_domain(str(tmp_path))
    assert domain == node.shm_domain(str(tmp_path / "sub")) and not domain.startswith("node:")
    assert domain.endswith(f":{os.stat(tmp_path).st_dev}")
    monkeypatch.setattr(node, "BOOT_ID", str(tmp_path / "no-boot-id"))      # no /proc: never taken as shared
    assert node.shm_domain(str(tmp_path)) == f"node:{node.node_key()}"


@pytest.mark.parametrize("args, message", [
    (["--link", "fast", "--", "x.py"], "is not a rate"),
    (["--hosts", "0", "--", "x.py"], "must be >= 1"),
    (["--prefix", "Bad-Name", "--", "x.py"], "--prefix"),
    ([], "no command"),
])
def test_bad_input_is_one_error_line(args, message):
    proc = subprocess.run([sys.executable, LOCAL_CLUSTER, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# ---- as root -----------------------------------------------------------------------------------------------
@needs_namespaces
def test_hosts_have_their_own_network_and_a_shaped_link():
    tool = load_tool()
    cluster = tool.LocalCluster(2, link="200mbit", prefix=new_prefix())
    try:
        cluster.up()
        inode = [subprocess.run(cluster.exec_argv(i, ["stat", "-L", "-c", "%i", "/proc/self/ns/net"]),
                                capture_output=True, text=True, check=True).stdout.strip() for i in range(2)]
        assert len(set(inode + [node.network_namespace_id()])) == 3       # distinct node keys, shared /dev/shm
        ping = subprocess.run(cluster.exec_argv(0, ["ping", "-c", "1", "-W", "2", cluster.address(1)]),
                              capture_output=True, text=True) if shutil.which("ping") else None
        assert ping is None or ping.returncode == 0, ping.stdout + ping.stderr
        qdisc = subprocess.run(cluster.exec_argv(1, ["tc", "qdisc", "show", "dev", "eth0"]),
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "200Mbit" in qdisc
        open(f"/dev/shm/seesaw-kv-{cluster.node_key(1)}-test", "wb").close()   # a file a dead host left
    finally:
        removed = cluster.down()
    assert removed == [f"seesaw-kv-{cluster.node_key(1)}-test"]
    assert not leftovers(cluster.prefix, None)


@needs_namespaces
def test_hosts_have_their_own_node_keys_and_share_the_machines_shm_unless_they_mount_their_own():
    if shutil.which("unshare") is None:
        pytest.skip("`unshare` (util-linux) is not installed: no private /dev/shm per host")
    tool = load_tool()
    cluster, own = tool.LocalCluster(2, prefix=new_prefix()), tool.LocalCluster(2, private_shm=True)
    probe = [sys.executable, "-c", "from seesaw_ds.distributed.node import node_key, shm_domain; "
                                   "print(node_key(), shm_domain('/dev/shm'))"]
    try:
        cluster.up()
        own.prefix = cluster.prefix            # the same hosts, run with a /dev/shm of their own
        shared = subprocess.run(cluster.exec_argv(0, probe), capture_output=True, text=True, check=True)
        private = subprocess.run(own.exec_argv(1, probe), capture_output=True, text=True)
        assert private.returncode == 0, private.stderr
    finally:
        cluster.down()
    (key0, domain0), (key1, domain1) = shared.stdout.split(), private.stdout.split()
    assert len({key0, key1, node.node_key()}) == 3
    assert domain0 == node.shm_domain("/dev/shm") != domain1
    assert domain1.split(":")[0] == domain0.split(":")[0]        # one kernel (boot id), another /dev/shm
    assert not leftovers(cluster.prefix, None)


@pytest.mark.slow
@needs_namespaces
def test_tp_across_hosts_is_refused_unless_allowed(tiny_model, articles, reference_rows, tmp_path):
    """TP2 over the two hosts: one error line naming the key, the hosts and the opt-in, exit 2, no weight
    loaded; with engine.allow_cross_node_tp=true the same layout runs, tokens as HF greedy."""
    refused, allowed = tmp_path / "refused", tmp_path / "allowed"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(refused), parallel="TP2"))
    prefix, port = new_prefix(), free_port()
    log = run_cluster(cluster_command(prefix, port, recipe), job_env(tmp_path), expect=2)
    assert error_lines(log) == [
        f"[h0] launch/generate.py: error: recipe key parallel.tp tp=2 puts a TP group across nodes: node "
        f"{prefix}-h0 (rank 0), node {prefix}-h1 (rank 1); a TP group all-reduces in every layer, so it stays "
        f"inside one node unless engine.allow_cross_node_tp is true (then it runs over the link between them)"], log
    assert "Traceback" not in log and "] engine: " not in log            # refused before the engine was built
    assert not glob.glob(str(refused / "*.parquet"))
    assert not leftovers(prefix, port)

    prefix, port = new_prefix(), free_port()
    log = run_cluster(cluster_command(prefix, port, recipe) + ["engine.allow_cross_node_tp=true",
                                                              f"output.dir={allowed}"], job_env(tmp_path))
    assert_rows_match(output_rows(allowed), reference_rows)
    assert "[h0] layouts: tp=2 pp=1 dp=1" in log and not error_lines(log)
    assert not leftovers(prefix, port)


@pytest.mark.slow
@needs_namespaces
def test_switching_pair_across_hosts_without_one_shm_is_refused(tiny_model, articles, tmp_path):
    """Each host with its own /dev/shm, as separate machines: PP2 -> TP2 over both cannot share the host KV
    store, whatever the TP opt-in says."""
    if shutil.which("unshare") is None:
        pytest.skip("`unshare` (util-linux) is not installed: no private /dev/shm per host")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        tiny_model[0], articles, str(tmp_path / "out"), parallel="PP2->TP2", engine={"allow_cross_node_tp": True}))
    prefix, port = new_prefix(), free_port()
    log = run_cluster(cluster_command(prefix, port, recipe, private_shm=True), job_env(tmp_path), expect=2)
    [line] = error_lines(log)
    assert line.startswith("[h0] launch/generate.py: error: recipe key parallel prefill tp=1 pp=2 dp=1 -> decode "
                           "tp=2 pp=1 dp=1 switches stages through the host KV store"), log
    assert f"spans nodes that do not share one: node {prefix}-h0 (rank 0), node {prefix}-h1 (rank 1)" in line
    assert "Traceback" not in log and "] engine: " not in log
    assert not leftovers(prefix, port)


@pytest.mark.slow
@needs_namespaces
def test_data_parallel_replicas_on_two_hosts_write_one_folder(tiny_model, articles, reference_rows, tmp_path):
    prefix, port = new_prefix(), free_port()
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                                                           parallel={"dp": 2}))
    log = run_cluster(cluster_command(prefix, port, recipe), job_env(tmp_path))
    rows = output_rows(tmp_path / "out")
    assert_rows_match(rows, reference_rows)
    assert all(row["layouts"] == "tp1pp1 dp=2" for row in rows)
    assert "[h0] layouts: tp=1 pp=1 dp=2" in log and "[h1] " in log and f"master 10.77.0.1:{port}" in log
    assert not leftovers(prefix, port)


@pytest.mark.slow
@needs_namespaces
def test_seesaw_over_two_hosts_plans_on_the_link_it_probed(tiny_model, articles, reference_rows, tmp_path):
    """`parallel: seesaw` over hosts of one rank on a 200 Mbit/s link: the job probes the link (its sustained
    rate within 30% of tc's 25 MB/s, the bucket found), plans on it with TP kept inside nodes, says so on
    one line, and the layout it runs gives the reference tokens."""
    prefix, port = new_prefix(), free_port()
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out")))
    log = run_cluster(cluster_command(prefix, port, recipe, link="200mbit"), job_env(tmp_path))
    assert "[h0] probing the link between nodes 0 and 1 (ranks 0 and 1) for the layout planner" in log, log
    fitted = [line for line in log.splitlines() if line.startswith("[h0] link between nodes (")]
    assert len(fitted) == 1 and "rate-limited (bucket " in fitted[0], log
    rate = float(fitted[0].split("all-reduce ")[1].split(" MB/s")[0])
    assert 25 * 0.7 <= rate <= 25 * 1.3, fitted[0]
    seesaw = [line for line in log.splitlines() if "] parallel: seesaw runs " in line]
    assert len(seesaw) == 1 and "not the pair PP2->TP2: its TP group would span nodes" in seesaw[0], log
    assert "on 2xlocal (2 nodes of 1, link " in seesaw[0]
    # both hosts run on this machine: its cores are split between their ranks, not taken by each
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f" rank, {threads} thread{'s' if threads > 1 else ''} per rank;" in log, log
    chosen = seesaw[0].split("parallel: seesaw runs ")[1].split(",")[0]
    assert_rows_match(output_rows(tmp_path / "out"), reference_rows)
    assert chosen in ("DP2", "PP2") and not error_lines(log), log
    assert not leftovers(prefix, port)


@pytest.mark.slow
@needs_namespaces
def test_pipeline_across_hosts_with_tp_inside_each(tiny_model, articles, reference_rows, tmp_path):
    """PP2xTP2 on 2 hosts x 2 ranks: each pipeline stage a TP group inside one host, activations crossing the
    link between stages; tokens as HF greedy."""
    prefix, port = new_prefix(), free_port()
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                                                           parallel={"tp": 2, "pp": 2}))
    log = run_cluster(cluster_command(prefix, port, recipe, ranks=2), job_env(tmp_path))
    assert_rows_match(output_rows(tmp_path / "out"), reference_rows)
    assert "[h0] layouts: tp=2 pp=2 dp=1 (4 ranks, 1 replica of 4 ranks, 1 thread per rank;" in log, log
    assert not error_lines(log) and not leftovers(prefix, port)


@pytest.mark.slow
@needs_namespaces
def test_pp_across_machines_then_tp_inside_each_switches_through_each_machines_store(articles, tmp_path):
    """PP4 -> PP2xTP2 on 2 hosts x 2 ranks, each host with its own /dev/shm (as separate machines): every KV
    move stays inside a host, so each host's own store serves the switch; tokens as HF greedy (a 4-layer model)."""
    if shutil.which("unshare") is None:
        pytest.skip("`unshare` (util-linux) is not installed: no private /dev/shm per host")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tests.conftest import hf_greedy
    from tests.jobs.tiny_tokenizer import char_tokenizer
    from tests.launch.conftest import MAX_TOKENS, TEMPLATE, article_rows
    folder, tokenizer = str(tmp_path / "model"), char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reference = {}
    for row in article_rows():
        ids = tokenizer(TEMPLATE.format(article=row["article"]))["input_ids"]
        reference[row["id"]] = {"prompt_token_ids": ids, "completion_token_ids": hf_greedy(model, ids, MAX_TOKENS),
                                "abstract": row["abstract"]}
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(folder, articles, str(tmp_path / "out"),
                                                           parallel="PP4->PP2xTP2"))
    prefix, port = new_prefix(), free_port()
    log = run_cluster(cluster_command(prefix, port, recipe, private_shm=True, ranks=2), job_env(tmp_path))
    assert_rows_match(output_rows(tmp_path / "out"), reference)
    assert "[h0] layouts: prefill tp=1 pp=4 dp=1 -> decode tp=2 pp=2 dp=1 (4 ranks" in log, log
    switches = [line for line in log.splitlines() if "engine, replica 0" in line]
    assert switches and "switches 0," not in switches[0], log
    assert not error_lines(log) and not leftovers(prefix, port)


LOST_HOST_LAYOUTS = {   # the pair (a TP group across the hosts), and static PP2 (decode in flight: p2p waits)
    "pp2-tp2": ({"prefill": {"pp": 2}, "decode": {"tp": 2}}, "prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1"),
    "pp2": ({"pp": 2}, "tp=1 pp=2 dp=1")}


@pytest.mark.slow
@needs_namespaces
@pytest.mark.parametrize("layout", list(LOST_HOST_LAYOUTS))
def test_layouts_across_hosts_survive_a_lost_host_and_resume(layout, tiny_model, articles, reference_rows,
                                                             tmp_path):
    """Kill -9 every process of host 1 once the first shard is written: host 0's rank must end within 60 s
    with an error; then the same command on a fresh cluster resumes, every row once, tokens as HF greedy."""
    parallel, described = LOST_HOST_LAYOUTS[layout]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(out), parallel=parallel,
                                                           engine={"allow_cross_node_tp": True}))
    env, prefix, port = job_env(tmp_path), new_prefix(), free_port()
    job = subprocess.Popen(cluster_command(prefix, port, recipe), cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not glob.glob(str(out / "*.parquet")):
            assert job.poll() is None, f"the job ended before its first shard:\n{job.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no shard within 600 s"
            time.sleep(0.05)
        pids = subprocess.run(["ip", "netns", "pids", f"{prefix}-h1"], capture_output=True, text=True).stdout
        assert pids.split(), "host 1 has no process to kill"
        lost_at = time.monotonic()
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        log, _ = job.communicate(timeout=LOST_HOST_LIMIT_S + 30)
        ended_after = time.monotonic() - lost_at
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGINT)       # the tool tears the cluster down on Ctrl-C
            job.wait(timeout=60)
    print(f"the job ended {ended_after:.1f} s after host 1 was lost")
    assert job.returncode != 0 and ended_after < LOST_HOST_LIMIT_S, log[-3000:]
    assert "local_cluster: host h1 exited with -9" in log
    assert any(line.startswith("[h0] ") and "error" in line.lower() for line in log.splitlines()), log[-3000:]
    assert not leftovers(prefix, port)
    interrupted = output_rows(out)
    assert 0 < len(interrupted) < len(reference_rows)
    assert len({r["id"] for r in interrupted}) == len(interrupted)

    prefix, port = new_prefix(), free_port()
    log = run_cluster(cluster_command(prefix, port, recipe), env)
    rows = output_rows(out)
    assert_rows_match(rows, reference_rows)
    assert {r["id"] for r in interrupted} <= {r["id"] for r in rows}
    assert f"[h0] layouts: {described}" in log, log[-3000:]
    assert not leftovers(prefix, port)
