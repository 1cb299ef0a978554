/* fastvae._cpu_features: the CPU features that decide which instruction-set level of
 * the native backend this CPU runs (fastvae/_cpu_isa.py names them). Compiled without
 * ISA flags, so it loads on any CPU of the architecture; it is imported before any
 * level's module. __builtin_cpu_supports also checks that the OS saves the AVX and
 * AVX-512 registers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Appends name to features if present; 0 on success, -1 with an exception set. */
static int add_if(PyObject* features, int present, const char* name) {
  if (!present) return 0;
  PyObject* str = PyUnicode_FromString(name);
  if (str == NULL) return -1;
  const int status = PyList_Append(features, str);
  Py_DECREF(str);
  return status;
}

static PyObject* cpu_features(PyObject* self, PyObject* unused) {
  PyObject* features = PyList_New(0);
  if (features == NULL) return NULL;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  /* __builtin_cpu_supports takes string literals only, hence one line per feature. */
  if (add_if(features, __builtin_cpu_supports("avx2"), "avx2") || add_if(features, __builtin_cpu_supports("fma"), "fma") ||
      add_if(features, __builtin_cpu_supports("f16c"), "f16c") ||
      add_if(features, __builtin_cpu_supports("avx512f"), "avx512f") ||
      add_if(features, __builtin_cpu_supports("avx512bw"), "avx512bw") ||
      add_if(features, __builtin_cpu_supports("avx512vl"), "avx512vl") ||
      add_if(features, __builtin_cpu_supports("avx512dq"), "avx512dq")) {
    Py_DECREF(features);
    return NULL;
  }
#endif
  return features;
}

static PyMethodDef methods[] = {
    {"cpu_features", cpu_features, METH_NOARGS, "The CPU features the native backend's levels need that this CPU has"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_features", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_features(void) { return PyModule_Create(&module); }
