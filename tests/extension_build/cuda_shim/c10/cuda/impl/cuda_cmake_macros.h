#pragma once
// Stand-in for the header that CUDA builds of torch generate; CPU wheels lack it.
// Used only to compile-check the .cu adapters on machines without a CUDA torch.
#define C10_CUDA_BUILD_SHARED_LIBS
