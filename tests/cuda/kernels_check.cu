// Instantiates every CUDA kernel template for every dtype, so `nvcc -c` on this file (see
// test_nvcc_compile.py) catches compile errors in csrc/include/distillx/cuda/*.cuh on machines
// without a GPU or a CUDA build of torch.
#include "distillx/cuda/divergence_row.cuh"

namespace dc = distillx::cuda;
template void dc::launch_logit_divergence<float, float>(const float*, const float*, const float*, float*, float*,
                                                        int64_t, int64_t, float, float, int, cudaStream_t);
template void dc::launch_logit_divergence<double, double>(const double*, const double*, const double*, double*,
                                                          double*, int64_t, int64_t, double, double, int, cudaStream_t);
template void dc::launch_logit_divergence<__half, float>(const __half*, const __half*, const float*, float*, __half*,
                                                         int64_t, int64_t, float, float, int, cudaStream_t);
template void dc::launch_logit_divergence<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                                const float*, float*, __nv_bfloat16*, int64_t, int64_t,
                                                                float, float, int, cudaStream_t);
