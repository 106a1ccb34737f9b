"""The neonatal method on the core (the dHCP neonatal paper): the dHCP manifest builder and the studies
(label budget, AgeU-Net, transfer learning), each several training runs driven as one command that
writes a table (see launch.py). The core imports nothing from here."""
