"""What the server says when it starts: the sandbox layers (active or DEGRADED), the admin API, and the
profiles folder's permissions (functions.toml holds every function's [env] secrets)."""

from __future__ import annotations

import os
import stat

from runner.config import Settings


def layer_lines(settings: Settings) -> list[tuple[bool, str]]:
    """(degraded, line) per sandbox layer: runner.doctor's structured checks (what /healthz shows too)."""
    from runner.doctor import layer_checks

    return [(not c.ok, f"sandbox layer {c.name}: {c.status}: {c.detail}") for c in layer_checks(settings)]


def profiles_exposure(profiles_dir: str) -> list[str]:
    """The profile files other users of this machine can read (through a folder they can enter)."""
    try:
        st = os.stat(profiles_dir)
    except OSError:
        return []
    if not st.st_mode & stat.S_IXOTH:
        return []
    exposed = []
    try:
        names = sorted(os.listdir(profiles_dir))
    except OSError:
        return []
    for name in names:
        path = os.path.join(profiles_dir, name)
        try:
            fst = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(fst.st_mode) and fst.st_mode & stat.S_IROTH:
            exposed.append(path)
    return exposed


def startup_lines(settings: Settings, admin_token: str | None) -> list[tuple[bool, str]]:
    """(warning, line) pairs for the start-up log."""
    lines = layer_lines(settings)
    degraded = sum(1 for bad, _ in lines if bad)
    lines.append((degraded > 0, f"sandbox: {len(lines) - degraded} layers active, {degraded} DEGRADED"
                                + (" (python -m runner.doctor explains each)" if degraded else "")))
    lines.append((False, "admin API: on (/admin, FNBOX_ADMIN_TOKEN is set)" if admin_token else
                  "admin API: off (set FNBOX_ADMIN_TOKEN to turn it on)"))
    exposed = profiles_exposure(settings.profiles_dir)
    if exposed:
        lines.append((True, f"the profiles folder {settings.profiles_dir} is readable by other users of this "
                            f"machine ({', '.join(os.path.basename(p) for p in exposed)}): [env] values are "
                            f"secrets; chmod 700 {settings.profiles_dir}"))
    return lines
