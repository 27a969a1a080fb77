"""Gunicorn settings for fnbox: `.venv/bin/gunicorn -c ops/gunicorn.conf.py` from the repo root.

Worker class: gthread. A call blocks its thread while the function runs (up to its timeout_s), so a sync
worker would block a whole process per call; with threads, slow calls only hold a thread each, and the
worker's main thread keeps notifying the master, so Gunicorn's `timeout` never kills a worker that is merely
waiting on slow functions (the function's own timeout_s ends the call). Each worker owns one fork server.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

bind = [os.environ.get("FNBOX_BIND", "127.0.0.1:8000")]
workers = int(os.environ.get("FNBOX_WORKERS", "2"))  # same defaults as runner.config.Settings
worker_class = "gthread"
threads = int(os.environ.get("FNBOX_THREADS", "32"))
wsgi_app = "gateway.app:create_app()"
# Heartbeat only (see above). Calls are bounded by their profiles, not by this.
timeout = 30
# A graceful stop lets calls in flight finish within their limits.
graceful_timeout = int(os.environ.get("FNBOX_GRACEFUL_TIMEOUT", "40"))
keepalive = 5
accesslog = os.environ.get("FNBOX_ACCESS_LOG") or None
errorlog = "-"
proc_name = "fnbox"
# Forwarded headers are trusted only from these addresses (nginx on the same host).
forwarded_allow_ips = os.environ.get("FNBOX_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")


def _metrics_dir():
    # prometheus_client's multiprocess mode: one fresh directory per server, set before any worker exists.
    import atexit
    import shutil
    import tempfile

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = tempfile.mkdtemp(prefix="fnbox-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        master = os.getpid()
        # A start that fails (a busy port, a bad profile) never reaches on_exit: remove the folder anyway, in
        # this process only (workers are forks of it and must not remove it when they exit).
        atexit.register(lambda: os.getpid() == master and shutil.rmtree(path, ignore_errors=True))


_metrics_dir()


def _refuse_busy_address():
    """Gunicorn retries a busy address five times, repeating its error: say once which variable moves it."""
    import socket

    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS"):
        return  # re-exec (USR2) or socket activation: the listeners are inherited, the address is ours
    for addr in bind:
        host, sep, port = addr.rpartition(":")
        if not sep or addr.startswith(("unix:", "fd://")) or not port.isdigit():
            continue
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gunicorn binds: TIME_WAIT is not busy
            try:
                s.bind((host, int(port)))
            except OSError as e:
                print(f"fnbox: cannot listen on {addr}: {e.strerror}. Another server has it (a `make run` still "
                      "running? `make stop` ends it). Set FNBOX_BIND=host:port to use another address, e.g. "
                      f"FNBOX_BIND={host}:{int(port) + 1} make run", file=sys.stderr)
                sys.exit(1)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    import shutil

    _stop_zygote(server, 10.0)  # the workers are gone, and their fork servers with them

    shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)
    if os.geteuid() == 0:  # the egress table of our sandbox uids (runner/egress.py) goes with the server
        from runner import egress
        from runner.config import ConfigError, Settings

        try:
            egress.remove(Settings.from_env().uid_base)
        except ConfigError:
            pass


def on_starting(server):
    _refuse_busy_address()
    # Refuse to start with an invalid profile folder, saying which file, key and why.
    from gateway.console.config import ConsoleConfig
    from runner.config import ConfigError, Settings, max_calls_for
    from runner.profiles import ProfileError, load_profiles

    try:
        settings = Settings.from_env()
        pset = load_profiles(settings.profiles_dir)
        console = ConsoleConfig.from_env()
        from jobs.config import JobSettings

        JobSettings.from_env()  # the queue's settings (docs/cluster.md)
    except (ProfileError, ConfigError) as e:
        print(f"fnbox: refusing to start: invalid configuration: {e}", file=sys.stderr)
        sys.exit(3)
    cap = max_calls_for(settings, pset.profiles["default"].memory_mb)
    server.log.info("fnbox: at most %d calls in flight (FNBOX_MAX_CALLS%s), %d workers x %d threads", cap,
                    "" if settings.max_calls else ", derived from memory and threads", workers, threads)
    # Which sandbox layers this machine and these privileges allow, the admin API, and secrets at risk.
    from gateway.startup import startup_lines

    try:
        for warning, line in startup_lines(settings, os.environ.get("FNBOX_ADMIN_TOKEN") or None):
            (server.log.warning if warning else server.log.info)("fnbox: %s", line)
    except Exception as e:  # a report must never keep the server from starting
        server.log.warning("fnbox: cannot report the sandbox layers: %r", e)
    server.log.info("%s", console.status_line())
    _limit_malloc_arenas(server, settings.malloc_arena_max)
    _share_with_workers(server)
    _start_zygote(server, settings)


def _start_zygote(server, settings):
    """One clean, warm process that forks every worker's fork server, so they share its image copy-on-write
    (runner/zygote.py). Started before any worker; the workers find it through the environment they inherit.
    A zygote that cannot start costs memory, not service: each worker then starts its own fork server. Its
    handle lives on the arbiter: a reload executes this file again, with fresh globals."""
    from runner.zygote import ENV_SOCKET, Zygote

    os.environ.pop(ENV_SOCKET, None)
    if not settings.zygote:
        server.log.info("fnbox: fork-server zygote off (FNBOX_ZYGOTE=0): each worker starts its own fork server")
        return
    try:
        server.fnbox_zygote = Zygote(settings.python)
    except OSError as e:
        server.log.warning("fnbox: cannot start the fork-server zygote (%r); each worker starts its own", e)
        return
    os.environ[ENV_SOCKET] = server.fnbox_zygote.path
    server.log.info("fnbox: fork-server zygote %d forks the workers' fork servers", server.fnbox_zygote.pid)


def _stop_zygote(server, timeout):
    zygote = getattr(server, "fnbox_zygote", None)
    if zygote is not None:
        server.fnbox_zygote = None
        zygote.stop(timeout)


def _limit_malloc_arenas(server, arenas):
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core), and each arena keeps the
    memory its thread freed: a worker's 32 request threads held megabytes after load. The limit is set here,
    in the master before any worker (or thread) exists, and forked workers inherit it."""
    if not arenas:
        return
    from runner import heap

    ok = heap.limit_arenas(arenas)
    server.log.info("fnbox: malloc arenas per worker: %s (FNBOX_MALLOC_ARENA_MAX)",
                    arenas if ok else "the C library's default (cannot set)")
    # Request and response bodies of 64 KiB and more get their own mapping, unmapped when freed, instead of
    # staying in a worker's heap after load (docs/performance.md, "Idle memory (v5)").
    if ok:
        heap.mmap_threshold(64 * 1024)


def _share_with_workers(server):
    """Imports the gateway's modules here in the master, before any worker is forked, so that the workers share
    those pages copy-on-write instead of importing (and holding) a private copy each; then freezes them, so a
    worker's garbage collections never write to (and copy) the shared objects' GC headers. Only modules: no
    app, thread, socket, SQLite connection or fork server is made here (create_app() in each worker does)."""
    import gc
    import glob

    from runner import heap

    before = len(sys.modules)
    try:
        import gateway.app  # noqa: F401  (everything create_app() and a request need)
    except Exception as e:  # each worker imports it then, and fails to boot with the full error, as before
        server.log.warning("fnbox: cannot import the gateway in the master (%r); each worker imports its own", e)
        return

    # Importing gateway.metrics made this process's multiprocess files (zeros); a worker makes its own on
    # first use, and /metrics must not list the master as a process.
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], f"*_{os.getpid()}.db")):
        os.unlink(path)
    gc.collect()
    gc.freeze()
    heap.trim()  # free C heap pages: a worker would copy each one it reuses, leaving the master a stale one
    server.log.info("fnbox: %d modules imported in the master and shared with the workers (%d frozen objects)",
                    len(sys.modules) - before, gc.get_freeze_count())


def on_reload(server):
    """SIGHUP (`systemctl reload fnbox`, the documented upgrade): the new workers are forked from this master,
    so fnbox's own modules are forgotten and imported again from disk first; new workers never run the code
    of the previous release."""
    import gc

    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    gc.unfreeze()
    # gateway.metrics registers its metrics in prometheus_client's global registry when imported: the old ones go.
    for metric in getattr(sys.modules.get("gateway.metrics"), "__dict__", {}).values():
        if isinstance(metric, MetricWrapperBase):
            REGISTRY.unregister(metric)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(root) and "site-packages" not in module.__file__:
            del sys.modules[name]
    _share_with_workers(server)
    # The new workers' fork servers must run the new release's runner too: a new zygote. The old one forks no
    # more and exits once the old workers' fork servers have ended (Gunicorn's reaping collects it).
    _stop_zygote(server, 0)
    from runner.config import ConfigError, Settings

    try:
        _start_zygote(server, Settings.from_env())
    except ConfigError as e:
        server.log.warning("fnbox: no fork-server zygote after the reload: %s", e)


def post_worker_init(worker):
    # The per-worker admission cap follows the threads this worker really has (a --threads on the command line
    # overrides FNBOX_THREADS, which create_app() used).
    from gateway.admission import worker_cap

    app = getattr(worker, "wsgi", None)
    rt = getattr(app, "extensions", {}).get("fnbox") if app is not None else None
    if rt is not None:
        rt.limiter.worker_max = worker_cap(worker.cfg.threads)


def worker_exit(server, worker):
    app = getattr(worker, "wsgi", None)
    rt = getattr(app, "extensions", {}).get("fnbox") if app is not None else None
    if rt is not None:
        from gateway.async_routes import shutdown

        shutdown(app)  # queued calls running here end (or go back to the queue) before the runner stops
        rt.supervisor.close()
        rt.history.close()

# Gunicorn's runtime control socket is not used by fnbox; one fixed path would also collide between servers.
control_socket_disable = True
