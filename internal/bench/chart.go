package bench

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"strconv"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Chart draws the report's curves as a PNG: hot-path throughput of Granary
// (own store, and through the host agent) and of raw etcd by concurrency,
// and waiter release latency (p50, p99) by
// number of waiters, with the 25 ms target.
func Chart(rep *Report) ([]byte, error) {
	s := rep.Series
	if len(s.HotConcurrency) == 0 || len(s.Waiters) == 0 {
		return nil, errors.New("nothing to draw")
	}
	const w, h = 1100, 460
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	title := fmt.Sprintf("granary-bench, %s, %d CPUs", rep.Meta.Date.Format("2006-01-02"), rep.Meta.CPUs)
	text(img, 20, 22, title, black)

	xs := func(v []int) []string {
		var out []string
		for _, x := range v {
			out = append(out, strconv.Itoa(x))
		}
		return out
	}
	hot := []line{
		{"Granary, own store (2 etcd writes)", blue, s.HotGranary, false},
		{"raw etcd (same 2 writes)", gray, s.HotRaw, false},
	}
	if len(s.HotAgent) == len(s.HotConcurrency) {
		hot = append(hot, line{"through the host agent (0 writes)", orange, s.HotAgent, false})
	}
	plot(img, image.Rect(70, 50, 530, 400), panel{
		title: "IncRef+DecRef pairs per second", xlabel: "concurrent callers", ylabel: "pairs/s",
		x: xs(s.HotConcurrency), lines: hot,
	})
	p99 := s.WaiterP99
	goal := make([]float64, len(p99))
	for i := range goal {
		goal[i] = 25
	}
	plot(img, image.Rect(620, 50, 1080, 400), panel{
		title: "waiter release after publish (ms)", xlabel: "goroutines waiting (over 3 stores)", ylabel: "ms",
		x: xs(s.Waiters),
		lines: []line{
			{"p50", blue, s.WaiterP50, false},
			{"p99", orange, p99, false},
			{"target p99 <= 25 ms", red, goal, true},
		},
	})
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

var (
	black  = color.RGBA{0, 0, 0, 255}
	gray   = color.RGBA{130, 130, 130, 255}
	light  = color.RGBA{225, 225, 225, 255}
	blue   = color.RGBA{31, 100, 180, 255}
	orange = color.RGBA{230, 120, 20, 255}
	red    = color.RGBA{200, 30, 30, 255}
)

type line struct {
	name   string
	c      color.RGBA
	ys     []float64
	dashed bool
}

type panel struct {
	title, xlabel, ylabel string
	x                     []string
	lines                 []line
}

// plot draws one panel in r: axes from 0 to a round maximum, categories
// evenly spaced on x, a legend in the upper left.
func plot(img *image.RGBA, r image.Rectangle, p panel) {
	top := 0.0
	for _, l := range p.lines {
		for _, y := range l.ys {
			top = max(top, y)
		}
	}
	step := niceStep(top / 5)
	top = step * math.Ceil(top*1.15/step)
	if top == 0 {
		top, step = 1, 0.2
	}
	text(img, r.Min.X, r.Min.Y-12, p.title, black)
	for v := 0.0; v <= top+step/2; v += step {
		y := r.Max.Y - int(v/top*float64(r.Dy()))
		hline(img, r.Min.X, r.Max.X, y, light, false)
		label := strconv.FormatFloat(v, 'f', -1, 64)
		text(img, r.Min.X-8-7*len(label), y+4, label, black)
	}
	vline(img, r.Min.X, r.Min.Y, r.Max.Y, black)
	hline(img, r.Min.X, r.Max.X, r.Max.Y, black, false)
	n := len(p.x)
	px := func(i int) int { return r.Min.X + (2*i+1)*r.Dx()/(2*n) }
	for i, lbl := range p.x {
		vline(img, px(i), r.Max.Y, r.Max.Y+5, black)
		text(img, px(i)-7*len(lbl)/2, r.Max.Y+18, lbl, black)
	}
	text(img, r.Min.X+r.Dx()/2-7*len(p.xlabel)/2, r.Max.Y+38, p.xlabel, black)
	for li, l := range p.lines {
		var prev image.Point
		for i, y := range l.ys {
			pt := image.Pt(px(i), r.Max.Y-int(y/top*float64(r.Dy())))
			if i > 0 {
				segment(img, prev, pt, l.c, l.dashed)
			}
			if !l.dashed {
				dot(img, pt, l.c)
			}
			prev = pt
		}
		ly := r.Min.Y + 14 + 16*li
		hline(img, r.Min.X+10, r.Min.X+34, ly-4, l.c, l.dashed)
		hline(img, r.Min.X+10, r.Min.X+34, ly-3, l.c, l.dashed)
		text(img, r.Min.X+40, ly, l.name, black)
	}
}

func niceStep(x float64) float64 {
	if x <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

func text(img *image.RGBA, x, y int, s string, c color.Color) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func hline(img *image.RGBA, x0, x1, y int, c color.RGBA, dashed bool) {
	for x := x0; x <= x1; x++ {
		if !dashed || (x/6)%2 == 0 {
			img.SetRGBA(x, y, c)
		}
	}
}

func vline(img *image.RGBA, x, y0, y1 int, c color.RGBA) {
	for y := y0; y <= y1; y++ {
		img.SetRGBA(x, y, c)
	}
}

// segment draws a 2-pixel line from a to b.
func segment(img *image.RGBA, a, b image.Point, c color.RGBA, dashed bool) {
	steps := max(abs(b.X-a.X), abs(b.Y-a.Y), 1)
	for i := 0; i <= steps; i++ {
		if dashed && (i/6)%2 == 1 {
			continue
		}
		x := a.X + (b.X-a.X)*i/steps
		y := a.Y + (b.Y-a.Y)*i/steps
		img.SetRGBA(x, y, c)
		img.SetRGBA(x, y+1, c)
		img.SetRGBA(x+1, y, c)
	}
}

func dot(img *image.RGBA, p image.Point, c color.RGBA) {
	for dx := -3; dx <= 3; dx++ {
		for dy := -3; dy <= 3; dy++ {
			if dx*dx+dy*dy <= 9 {
				img.SetRGBA(p.X+dx, p.Y+dy, c)
			}
		}
	}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}
