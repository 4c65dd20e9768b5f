# Locating the CUDA toolkit for a build against a CUDA-enabled torch.
#
# CMake derives the toolkit root from the path of nvcc, so a wrapper script on the PATH (one that
# execs the real nvcc) would point it at the wrong folder. ff_locate_nvcc() resolves the real
# compiler: CMAKE_CUDA_COMPILER / CUDACXX / CUDAToolkit_ROOT / CUDA_HOME when given, else the
# nvcc on the PATH, asking it where it lives (`nvcc --dryrun` prints its own folder).
macro(ff_locate_nvcc)
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    set(_ff_root "")
    if(CUDAToolkit_ROOT)
      set(_ff_root "${CUDAToolkit_ROOT}")
    elseif(DEFINED ENV{CUDAToolkit_ROOT})
      set(_ff_root "$ENV{CUDAToolkit_ROOT}")
    elseif(DEFINED ENV{CUDA_HOME})
      set(_ff_root "$ENV{CUDA_HOME}")
    endif()
    if(_ff_root AND EXISTS "${_ff_root}/bin/nvcc")
      set(CMAKE_CUDA_COMPILER "${_ff_root}/bin/nvcc")
    else()
      find_program(_ff_nvcc nvcc)
      if(_ff_nvcc)
        file(WRITE "${CMAKE_BINARY_DIR}/ff_probe.cu" "")
        execute_process(COMMAND "${_ff_nvcc}" --dryrun -c "${CMAKE_BINARY_DIR}/ff_probe.cu"
                        -o "${CMAKE_BINARY_DIR}/ff_probe.o"
                        OUTPUT_VARIABLE _ff_out ERROR_VARIABLE _ff_out RESULT_VARIABLE _ff_rc)
        if(_ff_out MATCHES "_HERE_=([^\r\n]+)")
          set(_ff_here "${CMAKE_MATCH_1}")
          if(EXISTS "${_ff_here}/nvcc")
            set(CMAKE_CUDA_COMPILER "${_ff_here}/nvcc")
          endif()
        endif()
        if(NOT CMAKE_CUDA_COMPILER)
          set(CMAKE_CUDA_COMPILER "${_ff_nvcc}")
        endif()
      endif()
    endif()
  endif()
endmacro()

# After enable_language(CUDA): what torch's CMake config needs to find the toolkit (its legacy
# FindCUDA module and nvrtc), the default architectures, and the include folders of the nvidia
# pip wheels torch depends on (cusparse.h and friends, which a minimal toolkit lacks).
macro(ff_cuda_toolkit_for_torch site_packages)
  set(_ff_tk "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
  if(NOT _ff_tk)
    get_filename_component(_ff_tk "${CMAKE_CUDA_COMPILER}" DIRECTORY)
    get_filename_component(_ff_tk "${_ff_tk}" DIRECTORY)
  endif()
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    set(CUDA_TOOLKIT_ROOT_DIR "${_ff_tk}" CACHE PATH "CUDA toolkit used by torch's CMake config")
  endif()
  if(NOT CUDAToolkit_ROOT)
    set(CUDAToolkit_ROOT "${_ff_tk}")
  endif()
  file(GLOB _ff_wheel_libs "${site_packages}/nvidia/*/lib" "${site_packages}/nvidia/cuda_nvrtc/lib")
  if(NOT CUDA_nvrtc_LIBRARY)
    find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
                 HINTS "${_ff_tk}/lib64" "${_ff_tk}/lib" ${_ff_wheel_libs})
  endif()
  set(FF_CUDA_EXTRA_INCLUDES "")
  if(NOT EXISTS "${_ff_tk}/include/cusparse.h")
    file(GLOB _ff_wheel_includes "${site_packages}/nvidia/*/include")
    foreach(_d IN LISTS _ff_wheel_includes)
      if(EXISTS "${_d}/cusparse.h" OR EXISTS "${_d}/cublas_v2.h")
        list(APPEND FF_CUDA_EXTRA_INCLUDES "${_d}")
      endif()
    endforeach()
  endif()
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
  endif()
  message(STATUS "fusedformer: CUDA toolkit ${_ff_tk}, nvrtc ${CUDA_nvrtc_LIBRARY}, arch list "
                 "${TORCH_CUDA_ARCH_LIST}$ENV{TORCH_CUDA_ARCH_LIST}")
endmacro()
