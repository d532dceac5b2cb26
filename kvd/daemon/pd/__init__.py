"""The PD roles (DESIGN.md §4): `DecodeRole` and `PrefillRole`, on their shared `PDRole` books."""
