// The Python module fusedformer._C. Loading it runs the static registrations of every op
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); the few functions below report and select the CPU
// instruction set and say whether the CUDA kernels were built.
#include <Python.h>

#include "fusedformer/cpu/kernels.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedformer::cpu::kernels().name);
}

PyObject* available_cpu_capabilities(PyObject*, PyObject*) {
  int n = 0;
  const char* const* names = fusedformer::cpu::available_isas(&n);
  PyObject* out = PyList_New(n);
  if (!out) return nullptr;
  for (int i = 0; i < n; ++i) PyList_SET_ITEM(out, i, PyUnicode_FromString(names[i]));
  return out;
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  if (!fusedformer::cpu::set_isa(name)) {
    PyErr_Format(PyExc_ValueError,
                 "set_cpu_capability: capability '%s' is not available on this CPU/build "
                 "(see fusedformer.available_cpu_capabilities())",
                 name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef FF_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "Instruction set used by the CPU kernels."},
    {"available_cpu_capabilities", available_cpu_capabilities, METH_NOARGS,
     "Instruction sets this build has and this CPU supports, best last."},
    {"set_cpu_capability", set_cpu_capability, METH_O, "Select the instruction set of the CPU kernels."},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fusedformer C++/CUDA ops", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
