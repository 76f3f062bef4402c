"""Tables: Delta Lake access and everything that writes to the tables besides the stages.

Owns: where tables live and how they are opened, created and evolved, the exactly-once commit and its one retry
policy, delta-rs' and object stores' errors translated into `gamestream.errors` (`lake`); OPTIMIZE, VACUUM and the
maintenance lock (`maintenance`); what every stage must know of forgotten players — the salted hashes, the
audit registry, change-data expiry (`forgotten`); the forget operation itself (`forget`); reading a table from a
user's script (`read`).

May import: core, log (the ownership leases and locks that guard maintenance and the KPI role)
"""
