"""Single-process references of whole worlds (A3; A2 fullmesh and hierarchy), written from the
the definitions of docs/, and importing only ``emu.core``: what every distributed rank is checked against."""
