package simulator

import "math/bits"

// seqSet is a set of one device's record sequences, a bit each: what a
// device had acknowledged, what the sink holds, what the service received.
type seqSet []uint64

// add puts seq in the set and reports whether it was new.
func (s *seqSet) add(seq uint32) bool {
	w := int(seq / 64)
	if w >= len(*s) {
		*s = append(*s, make([]uint64, w+1-len(*s))...)
	}
	bit := uint64(1) << (seq % 64)
	if (*s)[w]&bit != 0 {
		return false
	}
	(*s)[w] |= bit
	return true
}

// missingFrom counts the sequences of s that t lacks.
func (s seqSet) missingFrom(t seqSet) int64 {
	var n int64
	for w, x := range s {
		if w < len(t) {
			x &^= t[w]
		}
		n += int64(bits.OnesCount64(x))
	}
	return n
}
