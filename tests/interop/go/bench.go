package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	// nearest-rank
	idx := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	if idx < 0 {
		idx = 0
	}
	if idx >= len(sorted) {
		idx = len(sorted) - 1
	}
	return float64(sorted[idx].Nanoseconds()) / 1e3
}

func round2(f float64) float64 { return math.Round(f*100) / 100 }

func runBench(args []string) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	socket := fs.String("socket", "", "unix socket path to connect to")
	n := fs.Int("n", 1000, "number of measured calls (sequential, then concurrent)")
	size := fs.Int("size", 64, "Echo payload size in bytes")
	warmup := fs.Int("warmup", 100, "warmup calls")
	conc := fs.Int("concurrency", 16, "goroutines for the concurrent phase")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *socket == "" || *n <= 0 || *size < 0 || *warmup < 0 || *conc <= 0 {
		fmt.Fprintln(os.Stderr, "bench: need -socket, -n > 0, -size >= 0, -warmup >= 0")
		return 2
	}
	c, err := dial(*socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: connect: %v\n", err)
		return 1
	}
	defer c.Close()

	payload := make([]byte, *size)
	for i := range payload {
		payload[i] = byte('a' + i%26)
	}
	ctx := context.Background()
	call := func() error {
		got, err := echo(ctx, c, payload)
		if err == nil && len(got) != len(payload) {
			err = fmt.Errorf("echo returned %d bytes, want %d", len(got), len(payload))
		}
		return err
	}

	for i := 0; i < *warmup; i++ {
		if err := call(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: warmup: %v\n", err)
			return 1
		}
	}

	lat := make([]time.Duration, *n)
	seqStart := time.Now()
	for i := 0; i < *n; i++ {
		t := time.Now()
		if err := call(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: sequential: %v\n", err)
			return 1
		}
		lat[i] = time.Since(t)
	}
	seqElapsed := time.Since(seqStart)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })

	var (
		next   int64 = -1
		wg     sync.WaitGroup
		errMu  sync.Mutex
		concEr error
	)
	concStart := time.Now()
	for g := 0; g < *conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for atomic.AddInt64(&next, 1) < int64(*n) {
				if err := call(); err != nil {
					errMu.Lock()
					concEr = err
					errMu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	concElapsed := time.Since(concStart)
	if concEr != nil {
		fmt.Fprintf(os.Stderr, "bench: concurrent: %v\n", concEr)
		return 1
	}

	out := struct {
		Impl          string  `json:"impl"`
		N             int     `json:"n"`
		P50us         float64 `json:"p50_us"`
		P99us         float64 `json:"p99_us"`
		SeqCallsPerS  float64 `json:"seq_calls_per_s"`
		ConcCallsPerS float64 `json:"conc_calls_per_s"`
	}{
		Impl:          "go",
		N:             *n,
		P50us:         round2(percentile(lat, 50)),
		P99us:         round2(percentile(lat, 99)),
		SeqCallsPerS:  round2(float64(*n) / seqElapsed.Seconds()),
		ConcCallsPerS: round2(float64(*n) / concElapsed.Seconds()),
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
	return 0
}
