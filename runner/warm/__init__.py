# A stand-in functions folder, imported by runner.child.warm() exactly as a real function would be, so that a
# spare child pays the import machinery's copy-on-write faults before its call, not during it.
