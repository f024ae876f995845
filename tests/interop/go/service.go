package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	serviceName   = "kata_py.interop.v1.Interop"
	metadataKey   = "x-kata-test"
	missingServic = "kata_py.interop.v1.Missing"
)

// interopService returns the hand-written ServiceDesc for the contract.
func interopService() *ttrpc.ServiceDesc {
	return &ttrpc.ServiceDesc{
		Methods: map[string]ttrpc.Method{
			// Echo(BytesValue) -> BytesValue
			"Echo": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req wrapperspb.BytesValue
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return &wrapperspb.BytesValue{Value: req.Value}, nil
			},
			// Fail(StringValue "CODE:message") -> Empty, always an error status.
			"Fail": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req wrapperspb.StringValue
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				codeStr, msg, ok := strings.Cut(req.Value, ":")
				code, err := strconv.ParseUint(codeStr, 10, 32)
				if !ok || err != nil {
					return nil, status.Errorf(codes.InvalidArgument, "bad Fail request %q, want CODE:message", req.Value)
				}
				return nil, status.Error(codes.Code(code), msg)
			},
			// Sleep(Int64Value ms) -> Empty; DeadlineExceeded if the request
			// context ends first.
			"Sleep": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req wrapperspb.Int64Value
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				t := time.NewTimer(time.Duration(req.Value) * time.Millisecond)
				defer t.Stop()
				select {
				case <-t.C:
					return &emptypb.Empty{}, nil
				case <-ctx.Done():
					return nil, status.Error(codes.DeadlineExceeded, "deadline exceeded")
				}
			},
			// Metadata(Empty) -> StringValue: values of x-kata-test joined by ",".
			"Metadata": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req emptypb.Empty
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				var vals []string
				if md, ok := ttrpc.GetMetadata(ctx); ok {
					vals, _ = md.Get(metadataKey)
				}
				return &wrapperspb.StringValue{Value: strings.Join(vals, ",")}, nil
			},
			// Blob(Int64Value n) -> BytesValue of n 'x' bytes.
			"Blob": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req wrapperspb.Int64Value
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				if req.Value < 0 || req.Value > 64<<20 {
					return nil, status.Errorf(codes.InvalidArgument, "bad blob size %d", req.Value)
				}
				return &wrapperspb.BytesValue{Value: bytes.Repeat([]byte{'x'}, int(req.Value))}, nil
			},
		},
	}
}

func runServer(args []string) int {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	socket := fs.String("socket", "", "unix socket path to listen on")
	watchStdin := fs.Bool("watch-stdin", true, "exit when stdin reaches EOF")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "server: -socket is required")
		return 2
	}

	if err := os.Remove(*socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(os.Stderr, "server: remove stale socket: %v\n", err)
		return 1
	}
	l, err := net.Listen("unix", *socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: listen: %v\n", err)
		return 1
	}
	defer os.Remove(*socket)

	srv, err := ttrpc.NewServer()
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: new server: %v\n", err)
		return 1
	}
	srv.RegisterService(serviceName, interopService())

	stop := make(chan string, 3)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { s := <-sigs; stop <- "signal " + s.String() }()
	if *watchStdin {
		go func() { io.Copy(io.Discard, os.Stdin); stop <- "stdin EOF" }()
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(context.Background(), l) }()

	// Serve is running (the listener is already bound, so connections queue
	// from this point on).
	os.Stdout.WriteString("READY\n")
	os.Stdout.Sync()

	select {
	case why := <-stop:
		fmt.Fprintf(os.Stderr, "server: stopping (%s)\n", why)
		srv.Close()
		<-serveErr
		return 0
	case err := <-serveErr:
		if err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
			fmt.Fprintf(os.Stderr, "server: serve: %v\n", err)
			return 1
		}
		return 0
	}
}
