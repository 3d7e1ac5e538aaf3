"""The one mesh launcher: `Mesh` / `running` start a coordinator, workers and gateways as local
processes (moemesh.launch.mesh) over a group of named children (moemesh.launch.processes).
`moemesh up` (moemesh.launcher) and every test or benchmark that needs a mesh use it."""

from moemesh.launch.mesh import Mesh, MeshSpec, running
from moemesh.launch.processes import Processes

__all__ = ["Mesh", "MeshSpec", "Processes", "running"]
