"""``python -m darkroom.worker ...`` is ``darkroom ...`` (used to spawn workers from tests and the demo)."""

from darkroom.common.cli import main

main()
