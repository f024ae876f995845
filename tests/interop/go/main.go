// Command ttrpc-interop is a small helper built against the real
// github.com/containerd/ttrpc. The kata-py test suite uses it to check
// interoperability of the Python ttrpc implementation in both directions and
// to benchmark it.
//
// Modes:
//
//	ttrpc-interop server -socket PATH
//	ttrpc-interop client -socket PATH -case NAME [-strict]
//	ttrpc-interop bench  -socket PATH -n N -size BYTES -warmup W
//
// The service contract (kata_py.interop.v1.Interop) is implemented in
// service.go; the client check cases in cases.go; the benchmark in bench.go.
package main

import (
	"fmt"
	"os"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage:
  %[1]s server -socket PATH [-watch-stdin=true]
  %[1]s client -socket PATH -case NAME [-strict]
  %[1]s bench  -socket PATH -n N -size BYTES -warmup W

client cases: %[2]s, all (runs the first %[3]d in order), oversize-raw
`, os.Args[0], joinNames(), len(allCases))
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	mode, args := os.Args[1], os.Args[2:]
	switch mode {
	case "server":
		os.Exit(runServer(args))
	case "client":
		os.Exit(runClient(args))
	case "bench":
		os.Exit(runBench(args))
	case "-h", "-help", "--help", "help":
		usage()
		os.Exit(0)
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", mode)
		usage()
		os.Exit(2)
	}
}
