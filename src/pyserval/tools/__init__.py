"""Tools around pyserval rather than parts of it: pcap capture files for Wireshark/tshark
(:mod:`pyserval.tools.pcap`) and the shipped SAL dissector's location. Standard library only;
no layer of the stack depends on anything here but for its optional capture hooks."""
