//! Unit tests of exports: views, overlays, export disks.
