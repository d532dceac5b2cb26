"""The PD roles: `DecodeRole` and `PrefillRole`, on their shared `PDRole` books
(docs/architecture.md, "The PD event chain")."""
