"""What each role means to the schedule, in one table: its phase, what it excludes, how it loads and streams."""

from __future__ import annotations

from dataclasses import dataclass

#: Phase names of the encoders (all of them together) and of the VAEs; each DiT's phase is its own name.
ENCODER_PHASE, VAE_PHASE = "encoders", "vaes"


@dataclass(frozen=True)
class RolePolicy:
    """How the schedule treats the components of one role.

    Attributes:
        phase: the phase its components join: a shared name, ``"own"`` (each component is a phase of its own,
            as a DiT is), or ``None`` (tied to no phase: loaded on first use and counted in every phase).
        excludes: roles whose swapped parts and streaming slots leave the device before it runs (with no
            ``vram_budget`` given they never share the device with it).
        staged: a swapped load is issued stage by stage at block boundaries, each block waiting only for its
            own stage, so that the first call computes while the copy lands.
        timed: its blocks' compute times are measured during its first calls (the planner's calibration).
    """

    phase: str | None
    excludes: tuple[str, ...] = ()
    staged: bool = False
    timed: bool = False


ROLE_POLICIES: dict[str, RolePolicy] = {
    "encoder": RolePolicy(ENCODER_PHASE, excludes=("dit",)),
    "dit": RolePolicy("own", excludes=("dit", "encoder"), staged=True, timed=True),
    "vae": RolePolicy(VAE_PHASE),
    "resident": RolePolicy(None),
    "other": RolePolicy(None),
}


def policy(role: str) -> RolePolicy:
    """The policy of ``role`` (``"dit"``, ``"encoder"``, ``"vae"``, ``"resident"``, ``"other"``)."""
    return ROLE_POLICIES[str(role)]


def phase_of(name: str, role: str) -> str | None:
    """The phase the component ``name`` of ``role`` runs in, or ``None`` for one tied to no phase."""
    phase = policy(role).phase
    return name if phase == "own" else phase
