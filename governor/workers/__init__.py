"""What runs inside worker processes, and the OS tools that start, fence and kill them.

The engine imports this package; nothing here imports the engine. ``worker`` is a worker's
serve loop, ``template`` the warm process workers are forked from, ``hygiene`` what makes a
worker clean for every task, ``sandbox`` the pool lane's Landlock fence, ``proctree`` the
process-tree sampling and kills, ``frames`` the length-prefixed frames both sides speak,
``ray_worker`` the same worker side as a Ray task, ``libc`` the C library calls they need.
"""
