"""The Triton kernels, one module per stage with its launchers (recurrent, chunk, twopass,
transition, backward; common and chunk_math hold what they share), the training plan and autograd
Function (training), the Gluon kernels (gluon/), the role specs (roles) and ahead-of-time
compilation (aot)."""
